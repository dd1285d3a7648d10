"""``--compare OLD NEW``: per-row throughput ratios of two runs, regressions flagged.

A row regresses when its throughput falls by more than the threshold (default 5%), when it ran in
OLD but failed in NEW (OOM, error), or when its CUDA peak memory grows by more than twice the
threshold. Rows only in one run are listed, not counted. Exit status 1 when anything regressed.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from .report import row_key


def _load(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def compare(old: Dict[str, Any], new: Dict[str, Any], threshold: float = 0.05) -> Dict[str, Any]:
    old_rows = {row_key(r): r for r in old["results"]}
    new_rows = {row_key(r): r for r in new["results"]}
    lines: List[Dict[str, Any]] = []
    for key in list(old_rows) + [k for k in new_rows if k not in old_rows]:
        o, n = old_rows.get(key), new_rows.get(key)
        entry: Dict[str, Any] = {"key": key, "old": o, "new": n, "ratio": None, "mem_ratio": None, "flag": ""}
        if o is None or n is None:
            entry["flag"] = "only in new" if o is None else "only in old"
        elif o["status"] == "ok" and n["status"] != "ok":
            entry["flag"] = f"REGRESSION ({n['status']})"
        elif o["status"] == "ok" and n["status"] == "ok":
            entry["ratio"] = n["throughput"] / o["throughput"]
            om, nm = o.get("peak_mem_bytes"), n.get("peak_mem_bytes")
            if om and nm and o.get("mem_kind") == n.get("mem_kind") == "cuda_max_allocated":
                entry["mem_ratio"] = nm / om
            if entry["ratio"] < 1 - threshold:
                entry["flag"] = "REGRESSION"
            elif entry["mem_ratio"] is not None and entry["mem_ratio"] > 1 + 2 * threshold:
                entry["flag"] = "REGRESSION (memory)"
            elif entry["ratio"] > 1 + threshold:
                entry["flag"] = "faster"
        elif o["status"] != "ok" and n["status"] == "ok":
            entry["flag"] = "now runs"
        lines.append(entry)
    regressions = [e for e in lines if e["flag"].startswith("REGRESSION")]
    return {"rows": lines, "regressions": regressions, "threshold": threshold}


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_comparison(result: Dict[str, Any], old_name: str, new_name: str) -> str:
    out = [f"compare: old={old_name} new={new_name} (regression: slower by more than "
           f"{100 * result['threshold']:.1f}%, or failing, or CUDA peak memory up by more than "
           f"{200 * result['threshold']:.1f}%)"]
    header = ["group", "variant", "implementation", "dtype", "batch", "old thr", "new thr", "ratio", "mem ratio", "flag"]
    table = []
    for e in result["rows"]:
        group, variant, impl, backend, dtype, batch = e["key"]
        label = (e["new"] or e["old"]).get("label") or (backend or impl)
        o, n = e["old"], e["new"]
        table.append([group, variant, str(label), dtype, str(batch),
                      _fmt(o.get("throughput") if o else None, ".1f"), _fmt(n.get("throughput") if n else None, ".1f"),
                      _fmt(e["ratio"], ".3f"), _fmt(e["mem_ratio"], ".3f"), e["flag"]])
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(header)]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    n_reg = len(result["regressions"])
    out.append(f"{n_reg} regression(s) in {len(result['rows'])} row(s)")
    return "\n".join(out)


def compare_files(old_path: str, new_path: str, threshold: float = 0.05) -> int:
    result = compare(_load(old_path), _load(new_path), threshold)
    print(format_comparison(result, old_path, new_path))
    return 1 if result["regressions"] else 0
