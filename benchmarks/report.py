"""Results as JSON, console tables, a Markdown report and PNG plots."""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from .config import GROUP_TITLES


def row_key(r: Dict[str, Any]) -> Tuple:
    """Identity of a measurement across runs (used by --compare)."""
    return (r["group"], r["variant"], r["impl"], r.get("backend"), r["dtype"], r["batch"])


def annotate(rows: List[Dict[str, Any]]) -> None:
    """Speed-ups over the reference backend: same workload, batch and dtype, and over reference fp32."""
    refs = {}
    for r in rows:
        if r["impl"] == "blip_fast" and r.get("backend") == "reference" and r["status"] == "ok":
            refs[(r["group"], r["variant"], r["dtype"], r["batch"])] = r["throughput"]
    for r in rows:
        if r["status"] != "ok":
            r["speedup_vs_reference"] = r["speedup_vs_reference_fp32"] = None
            continue
        same = refs.get((r["group"], r["variant"], r["dtype"], r["batch"]))
        fp32 = refs.get((r["group"], r["variant"], "fp32", r["batch"]))
        r["speedup_vs_reference"] = r["throughput"] / same if same else None
        r["speedup_vs_reference_fp32"] = r["throughput"] / fp32 if fp32 else None


def write_json(data: Dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


# -- formatting ------------------------------------------------------------------------------------
def _num(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    if abs(x) >= 1e5:
        return f"{x:,.0f}"
    if 0 < abs(x) < 10 ** -digits * 10:
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _mem(r: Dict[str, Any]) -> str:
    b = r.get("peak_mem_bytes")
    if b is None:
        return "n/a"
    if r.get("mem_kind") == "cuda_max_allocated":
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.0f} MiB " + ("RSS" if r.get("mem_kind") == "rss_peak" else "RSS*")


def _ops_off_reference(r: Dict[str, Any]) -> str:
    used = r.get("ops_used") or {}
    parts = []
    for op, per_backend in sorted(used.items()):
        others = sorted(b for b in per_backend if b != "reference")
        if others:
            mixed = "+ref" if "reference" in per_backend else ""
            parts.append(f"{op}:{'/'.join(others)}{mixed}")
    return ", ".join(parts) if parts else ("all reference" if used else "")


def _columns(rows: List[Dict[str, Any]], device_type: str) -> List[Tuple[str, Any]]:
    has_fp32_ref = any(r.get("speedup_vs_reference_fp32") is not None and r["dtype"] != "fp32" for r in rows)
    unit = rows[0]["unit"] if rows else ""
    cols: List[Tuple[str, Any]] = [
        ("variant", lambda r: r["variant"]),
        ("implementation", lambda r: r["label"] if r["impl"] == "blip_fast" else r["label"]),
        ("dtype", lambda r: r["dtype"]),
        ("batch", lambda r: str(r["batch"])),
        (f"throughput ({unit})", lambda r: _num(r.get("throughput"))),
        ("median ms", lambda r: _num(r.get("median_ms"), 2)),
        ("p10-p90 ms", lambda r: "-" if r.get("p10_ms") is None else f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}"),
        ("peak mem", _mem),
        ("x ref", lambda r: _ratio(r.get("speedup_vs_reference"))),
    ]
    if has_fp32_ref:
        cols.append(("x ref fp32", lambda r: _ratio(r.get("speedup_vs_reference_fp32"))))
    cols.append(("TFLOP/s", lambda r: _num(r.get("tflops"), 1)))
    if device_type == "cuda":
        cols.append(("MFU", lambda r: "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"))
    cols.append(("status", lambda r: r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('reason') or '')[:70]}"))
    return cols


def display_order(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of one group side by side: by variant, batch, dtype, then blip_fast before the peers."""
    variants = {v: i for i, v in enumerate(OrderedDict.fromkeys(r["variant"] for r in rows))}
    labels = {v: i for i, v in enumerate(OrderedDict.fromkeys(r["label"] for r in rows))}
    return sorted(rows, key=lambda r: (variants[r["variant"]], r["batch"], r["dtype"] != "fp32",
                                       r["impl"] != "blip_fast", labels[r["label"]]))


def console_table(group: str, rows: List[Dict[str, Any]], device_type: str) -> str:
    rows = display_order(rows)
    cols = _columns(rows, device_type)
    cells = [[str(fn(r)) for _, fn in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _) in enumerate(cols)]
    lines = [f"\n== {group}: {GROUP_TITLES.get(group, '')}"]
    lines.append("  ".join(h.ljust(w) for (h, _), w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    return "\n".join(lines)


def markdown(data: Dict[str, Any]) -> str:
    meta, rows = data["meta"], data["results"]
    dev = meta.get("device")
    out = ["# blip_fast benchmark report", ""]
    facts = [
        ("date (UTC)", meta.get("date")), ("device", meta.get("device_name")), ("driver", meta.get("driver")),
        ("CUDA", meta.get("cuda")), ("torch", meta.get("torch")), ("triton", meta.get("triton")),
        ("transformers", meta.get("transformers")), ("timm", meta.get("timm")), ("git commit", meta.get("git_commit")),
        ("command", f"`{meta.get('command')}`"), ("sizes", (meta.get("sizes") or {}).get("name")),
        ("dtypes", (meta.get("settings") or {}).get("dtype_policy")),
        ("TF32 for fp32 matmuls / cuDNN convolutions", f"{meta.get('tf32_matmul')} / {meta.get('tf32_cudnn', 'n/a')}"), ("tokenisation (outside timing)", meta.get("tokenization")),
        ("backends run", ", ".join(meta.get("backends_run") or [])),
    ]
    mm = meta.get("matmul") or {}
    if mm.get("tflops"):
        facts.append(("bf16 matmul rate (MFU denominator)",
                      f"{mm['tflops']:.0f} TFLOP/s ({mm['n']}^3, median of {mm['reps']})"))
    s = meta.get("settings") or {}
    facts.append(("steps", f"{s.get('warmup')} warm-up + up to {s.get('steps')} timed per case, "
                           f"{s.get('input_sets')} rotating input sets, at most {s.get('max_case_seconds')} s per case"))
    for k, v in facts:
        out.append(f"- **{k}**: {v}")
    not_run = {**{k: v for k, v in (meta.get("backends_known") or {}).items() if v},
               **(meta.get("peers_unavailable") or {})}
    if not_run:
        out.append("- **not run here**: " + "; ".join(f"{k} ({v})" for k, v in not_run.items()))
    out += ["", "Method: synthetic data (random images, 15-20-word random captions tokenised before timing); "
            "each step is bracketed by a device synchronisation and CUDA events (host clock on CPU); the table "
            "gives the median over the timed steps and the p10-p90 spread. `x ref` is throughput over the "
            "`reference` backend at the same workload, batch and dtype; `x ref fp32` over reference in float32. "
            "A backend other than reference/auto runs the ops it supports and falls back to reference for the "
            "rest (column *ops off reference*). Peak memory is `torch.cuda.max_memory_allocated` per case "
            "(weights, gradients and optimizer state included); on CPU the process peak RSS. FLOPs are counted "
            "analytically (benchmarks/flops.py); MFU is against the bf16 matmul rate above, for every dtype.", ""]
    groups = list(OrderedDict.fromkeys(r["group"] for r in rows))
    for g in groups:
        grows = display_order([r for r in rows if r["group"] == g])
        out.append(f"## {g}: {GROUP_TITLES.get(g, '')}")
        shapes = OrderedDict()
        for r in grows:
            if r.get("shape"):
                shapes.setdefault((r["variant"], r["batch"]), r["shape"])
        if shapes:
            out.append("")
            for (variant, batch), shape in list(shapes.items())[:8]:
                desc = ", ".join(f"{k}={v}" for k, v in shape.items() if v is not None)
                out.append(f"- {variant}, batch {batch}: {desc}")
        cols = _columns(grows, dev) + [("ops off reference", _ops_off_reference)]
        out += ["", "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
        for r in grows:
            out.append("| " + " | ".join(str(fn(r)).replace("|", "/") for _, fn in cols) + " |")
        out.append("")
    out += ["## Plots", "", "![throughput](throughput.png)", "", "![peak memory](memory.png)", ""]
    return "\n".join(out)


# -- plots -----------------------------------------------------------------------------------------
def _plot(rows: List[Dict[str, Any]], value, ylabel: str, title: str, path: str) -> bool:
    """One panel per workload group; x: (variant, batch); one bar series per implementation+dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and value(r) is not None]
    groups = list(OrderedDict.fromkeys(r["group"] for r in ok))
    if not groups:
        return False
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        prow = [r for r in ok if r["group"] == g]
        cats = list(OrderedDict.fromkeys((r["variant"], r["batch"]) for r in prow))
        one_batch = len({b for _, b in cats}) == 1
        series = list(OrderedDict.fromkeys(f"{r['label']} {r['dtype']}" for r in prow))
        width = 0.8 / max(1, len(series))
        for i, name in enumerate(series):
            xs, ys = [], []
            for j, cat in enumerate(cats):
                match = [r for r in prow if f"{r['label']} {r['dtype']}" == name and (r["variant"], r["batch"]) == cat]
                if match:
                    xs.append(j + (i - (len(series) - 1) / 2) * width)
                    ys.append(value(match[0]))
            ax.bar(xs, ys, width=width, label=name[:48])
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([v if one_batch else f"{v}\nb={b}" for v, b in cats], fontsize=7,
                           rotation=30 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")
        ax.set_ylabel(ylabel.format(unit=prow[0]["unit"]), fontsize=8)
        ax.set_title(g + (f" (batch {cats[0][1]})" if one_batch else ""), fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_reports(data: Dict[str, Any], out_dir: str, plots: bool = True) -> List[str]:
    """Write report.md (and throughput.png, memory.png); returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    annotate(data["results"])
    written = []
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(data))
    written.append(md_path)
    if plots:
        rows = data["results"]
        meta = data["meta"]
        device = meta.get("device_name") or meta.get("device")
        try:
            p = os.path.join(out_dir, "throughput.png")
            if _plot(rows, lambda r: r.get("throughput"), "throughput ({unit})", f"Throughput by backend and batch ({device})", p):
                written.append(p)
            cuda = meta.get("device") == "cuda"
            p = os.path.join(out_dir, "memory.png")
            scale = 2**30 if cuda else 2**20
            if _plot(rows, lambda r: None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / scale,
                     "peak memory (GiB)" if cuda else "peak RSS (MiB)", f"Peak memory by backend and batch ({device})", p):
                written.append(p)
        except ImportError as exc:
            written.append(f"(plots skipped: {exc})")
    return written
