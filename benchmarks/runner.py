"""``blip-fast bench`` / ``python -m benchmarks``: model-level throughput, side by side.

Runs every selected workload on every op backend available at run time (plus ``auto``) and the
installed peers, on the GPU when there is one, else a tiny CPU configuration. Writes
``results.json`` after every case (a run cut short still leaves its data), then ``report.md``,
``throughput.png`` and ``memory.png`` into ``--out``; ``--compare OLD NEW`` diffs two runs.

Backends: ``reference`` and ``auto`` run as the dispatcher defines them. Any other backend ``X``
runs "``X`` where it supports the call, ``reference`` elsewhere" (the dispatcher's ``auto`` walk
restricted to ``[X, reference]``), since most backends implement only some of the ops; with
``--strict-backends`` the backend runs alone and a missing op is recorded as unsupported. Every
row records which backend ran each op (``ops_used``), traced on the first warm-up step.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

import blip_fast
from blip_fast import ops
from blip_fast.ops import _dispatch
from blip_fast.ops.measured import LIBRARY_BACKENDS

from . import compare as compare_mod
from . import config as cfg
from . import data, env, peers, report, timing
from .workloads import (AttentionOp, CaptionGenerate, Context, ItmInference, NlvrStep, PretrainStep, TextOnly,
                        VitOnly, Workload, attention_shapes)

SCHEMA = 1


# -- argument parsing ------------------------------------------------------------------------------
def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="groups: " + ", ".join(cfg.GROUPS) + "\npeers: " + ", ".join(cfg.ALL_PEERS))
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out/)")
    p.add_argument("--workloads", type=_csv, help="comma-separated groups (default: all for the device)")
    p.add_argument("--backends", type=_csv,
                   help="comma-separated op backends, e.g. reference,sdpa,triton,auto (default: every backend "
                        "available at run time, plus auto)")
    p.add_argument("--strict-backends", action="store_true",
                   help="run each backend alone (no reference fallback for ops it lacks)")
    p.add_argument("--peers", type=_csv, help=f"peers to run where installed (default: {','.join(cfg.ALL_PEERS)})")
    p.add_argument("--no-peers", action="store_true", help="run no peers")
    p.add_argument("--batch-sizes", action="append", default=[], metavar="[GROUP=]B1,B2",
                   help="batch sizes for every group, or GROUP=... for one (repeatable)")
    p.add_argument("--dtype", type=_csv, metavar="fp32,bf16",
                   help="dtypes: fp32 and/or bf16 (autocast). Default on GPU: bf16, plus fp32 for the reference "
                        "pretraining step; on CPU: fp32")
    p.add_argument("--fp32-backends", type=_csv, metavar="NAMES",
                   help="with --dtype including fp32: run fp32 only for these backends ('peers' for the peers)")
    p.add_argument("--steps", type=int, help="timed steps per case")
    p.add_argument("--warmup", type=int, help="warm-up steps per case (at least 1)")
    p.add_argument("--input-sets", type=int, help="pre-generated input sets rotated among the steps")
    p.add_argument("--max-case-seconds", type=float, help="cap on timed seconds per case (fewer steps, at least 3)")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run; cases past it are skipped")
    p.add_argument("--quick", action="store_true", help="reduced set of workloads and steps")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cuda or cpu")
    p.add_argument("--size", choices=["auto", "full", "tiny"], default="auto",
                   help="model sizes: full (BLIP's) or tiny; auto: full on GPU, tiny on CPU")
    p.add_argument("--tokenizer", choices=["auto", "real", "synthetic"], default="auto",
                   help="caption tokenisation (done once, before timing)")
    p.add_argument("--attention-patterns", type=_csv,
                   help="vit_self, bert_self_padding, cross, decoder_causal (default: all)")
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (default on CPU: 1; the tiny ops gain nothing from more, and "
                        "OpenMP spinning on a shared machine made steps 10-40x slower)")
    p.add_argument("--compile", choices=["off", "also", "only"], default="off",
                   help="also (or only) time every model wrapped in torch.compile; rows get impl '<impl>+compile'")
    p.add_argument("--cuda-graph", choices=["off", "also", "only"], default="off",
                   help="also (or only) replay whole training steps from a CUDA graph where the workload "
                        "supports it (blip_fast.cuda_graph.CUDAGraphStep); rows get impl '<impl>+graph' (with "
                        "--compile also '<impl>+compile+graph': the compiled model captured)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="build the pretraining models with every ViT block and BERT layer checkpointed")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for --compile (default, reduce-overhead, max-autotune, ...)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (off by default)")
    p.add_argument("--no-matmul", action="store_true", help="skip the bf16 matmul-rate measurement")
    p.add_argument("--git-commit", help="commit to record (default: $BLIP_FAST_GIT_COMMIT or git rev-parse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="print the cases that would run and exit")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two results.json files and exit")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="--compare: relative slow-down counted as a regression (default 0.05)")
    p.add_argument("--report-from", metavar="JSON", help="rewrite report.md and plots from a results.json")
    p.add_argument("--print", dest="print_tables", action="store_true",
                   help="with --report-from: also print the console tables")
    return p


def parse_batch_sizes(specs: List[str], groups: List[str]) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for spec in specs:
        if "=" in spec:
            group, values = spec.split("=", 1)
            targets = [group.strip()]
            if targets[0] not in cfg.GROUPS:
                raise SystemExit(f"--batch-sizes: unknown group {targets[0]!r} (groups: {', '.join(cfg.GROUPS)})")
        else:
            targets, values = groups, spec
        try:
            sizes = [int(v) for v in _csv(values)]
        except ValueError:
            raise SystemExit(f"--batch-sizes: not a list of integers: {values!r}")
        if not sizes or min(sizes) < 1:
            raise SystemExit(f"--batch-sizes: need positive integers, got {values!r}")
        for g in targets:
            out[g] = sizes
    return out


# -- backend selection -----------------------------------------------------------------------------
def discover_backends() -> Dict[str, Optional[str]]:
    """Every known backend -> None if it can run here, else why not (evaluated now, at run time)."""
    found = {}
    for name, reason in blip_fast.available_backends().items():
        if reason is None and not _dispatch.get_backend_object(name).ops:
            reason = f"backend {name!r} loads but implements no ops yet"
        found[name] = reason
    return found


def order_backends(names: List[str]) -> List[str]:
    rank = {n: i for i, n in enumerate(["reference"] + [b for b in reversed(_dispatch.AUTO_ORDER) if b != "reference"])}
    return sorted(names, key=lambda n: (n == ops.AUTO, rank.get(n, len(rank)), n))


@contextlib.contextmanager
def backend_scope(name: Optional[str], strict: bool) -> Iterator[None]:
    """Select ``name`` for every op inside; a non-reference backend falls back to reference
    for the ops (or calls) it does not support unless ``strict``."""
    if name is None:
        yield
        return
    if name in (ops.AUTO, "reference") or strict:
        with ops.use_backend(name):
            yield
        return
    saved = list(_dispatch.AUTO_ORDER)
    _dispatch.AUTO_ORDER[:] = [name, "reference"]
    # The library backends' auto checks are measured routing (blip_fast.ops.measured), not
    # capability: here the point is to run them wherever they can.
    backend = _dispatch.get_backend_object(name)
    saved_checks = backend.auto_checks
    if name in LIBRARY_BACKENDS:
        backend.auto_checks = {}
    try:
        with ops.use_backend(ops.AUTO):
            yield
    finally:
        _dispatch.AUTO_ORDER[:] = saved
        backend.auto_checks = saved_checks


@contextlib.contextmanager
def trace_ops() -> Iterator[Dict[str, collections.Counter]]:
    """Count which backend ran each op call inside the block."""
    counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    original = _dispatch.resolve

    def traced(op, *args, **kwargs):
        name, fn = original(op, *args, **kwargs)
        counts[op][name] += 1
        return name, fn

    _dispatch.resolve = traced
    try:
        yield counts
    finally:
        _dispatch.resolve = original


# -- progress --------------------------------------------------------------------------------------
class Progress:
    """One stderr line per case (rewritten in place on a terminal, with per-step updates)."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.index = 0
        self.prefix = ""

    def start(self, text: str) -> None:
        self.index += 1
        self.prefix = f"[{self.index}/{self.total}] {text}"
        if self.tty:
            self._write("\r\033[K" + self.prefix)

    def step(self, phase: str, i: int, n: int, ms: float) -> None:
        if self.tty:
            self._write(f"\r\033[K{self.prefix}: {phase} {i}/{n} ({ms:.1f} ms)")

    def end(self, text: str) -> None:
        self._write(("\r\033[K" if self.tty else "") + f"{self.prefix}: {text}\n")

    def note(self, text: str) -> None:
        self._write(("\r\033[K" if self.tty else "") + text + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


# -- the run ---------------------------------------------------------------------------------------
def group_workloads(group: str, ctx: Context, patterns: List[str], peer_names: List[str]) -> List[Workload]:
    if group in ("pretrain", "pretrain_large"):
        own: List[Workload] = [PretrainStep(ctx, large=group == "pretrain_large")]
    elif group in ("itm", "itc"):
        own = [ItmInference(ctx, group)]
    elif group == "nlvr":
        own = [NlvrStep(ctx)]
    elif group == "vit":
        own = [VitOnly(ctx, backward=False), VitOnly(ctx, backward=True)]
    elif group == "text":
        own = [TextOnly(ctx, backward=False), TextOnly(ctx, backward=True)]
    elif group == "attention":
        own = [AttentionOp(ctx, p, bwd) for p in patterns for bwd in (False, True)]
    elif group == "caption":
        own = [CaptionGenerate(ctx)]
    else:
        raise ValueError(group)
    return own + peers.peer_workloads(group, ctx, peer_names, patterns)


class Runner:
    def __init__(self, args: argparse.Namespace, argv: List[str], prog: str):
        self.args = args
        self.device = self._device(args.device)
        self._threads_before = torch.get_num_threads()
        if args.threads or self.device.type == "cpu":
            torch.set_num_threads(args.threads or 1)
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        d = cfg.defaults(self.device.type, args.quick)
        size = args.size if args.size != "auto" else ("full" if self.device.type == "cuda" else "tiny")
        self.sizes = cfg.FULL if size == "full" else cfg.TINY
        if size == "full":
            default_batches = cfg.GPU_QUICK_BATCHES if args.quick else cfg.GPU_BATCHES
            default_groups = list(cfg.GPU_QUICK_BATCHES) if args.quick else list(cfg.GROUPS)
        else:
            default_batches = cfg.CPU_BATCHES
            default_groups = list(cfg.CPU_QUICK_GROUPS) if args.quick else list(cfg.GROUPS)
        self.groups = args.workloads or default_groups
        unknown = [g for g in self.groups if g not in cfg.GROUPS]
        if unknown:
            raise SystemExit(f"unknown workload group(s) {unknown}; groups: {', '.join(cfg.GROUPS)}")
        self.batches = {g: list(default_batches.get(g, cfg.GPU_BATCHES[g] if size == "full" else [2]))
                        for g in self.groups}
        self.batches.update(parse_batch_sizes(args.batch_sizes, self.groups))
        self.steps = max(1, args.steps if args.steps is not None else d.steps)
        self.warmup = max(1, args.warmup if args.warmup is not None else d.warmup)
        self.input_sets = max(1, args.input_sets if args.input_sets is not None else d.input_sets)
        self.max_case_s = args.max_case_seconds if args.max_case_seconds is not None else d.max_case_seconds
        self.deadline = time.monotonic() + args.time_budget if args.time_budget else None
        quick_cpu_patterns = ["vit_self", "decoder_causal"] if args.quick and size == "tiny" else None
        self.patterns = args.attention_patterns or quick_cpu_patterns or list(attention_shapes(self.sizes, 1))
        bad = [p for p in self.patterns if p not in attention_shapes(self.sizes, 1)]
        if bad:
            raise SystemExit(f"unknown attention pattern(s) {bad}")

        self.backend_status = discover_backends()
        if args.backends:
            known = set(self.backend_status) | {ops.AUTO}
            unknown = [b for b in args.backends if b not in known]
            if unknown:
                raise SystemExit(f"unknown backend(s) {unknown}; known: {sorted(known)}")
            self.backends = order_backends(list(dict.fromkeys(args.backends)))
        else:
            if self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" \
                    and self.backend_status.get("triton") is None:
                self.backend_status["triton"] = ("runs in the Triton interpreter here (TRITON_INTERPRET=1), which "
                                                  "measures nothing useful; ask for it with --backends triton")
            self.backends = order_backends([n for n, r in self.backend_status.items() if r is None] + [ops.AUTO])
        if args.no_peers:
            requested_peers: List[str] = []
        else:
            requested_peers = args.peers if args.peers is not None else list(cfg.ALL_PEERS)
            unknown = [x for x in requested_peers if x not in cfg.ALL_PEERS]
            if unknown:
                raise SystemExit(f"unknown peer(s) {unknown}; peers: {', '.join(cfg.ALL_PEERS)}")
        self.peer_status = peers.peer_availability() if requested_peers else {}
        self.peers = [x for x in requested_peers if self.peer_status.get(x) is None]
        if args.dtype:
            bad = [x for x in args.dtype if x not in ("fp32", "bf16")]
            if bad:
                raise SystemExit(f"--dtype takes fp32 and/or bf16, got {bad}")
        self.tokenizer = data.Tokenizer(args.tokenizer)
        self.ctx = Context(self.device, self.sizes, self.tokenizer, seed=args.seed)
        self.ctx.checkpointing = args.activation_checkpointing
        self.out = args.out
        self.meta = {
            "schema": SCHEMA,
            **env.collect(self.device, prog, argv, args.git_commit),
            "sizes": self.sizes.describe(),
            "settings": {"steps": self.steps, "warmup": self.warmup, "input_sets": self.input_sets,
                         "max_case_seconds": self.max_case_s, "time_budget_s": args.time_budget,
                         "quick": args.quick, "strict_backends": args.strict_backends, "seed": args.seed,
                         "groups": self.groups, "batches": self.batches,
                         "dtype_policy": self.dtype_policy_text()},
            "backends_known": self.backend_status,
            "backends_run": self.backends,
            "peers_requested": requested_peers,
            "peers_unavailable": {k: v for k, v in self.peer_status.items() if v is not None},
            "tokenization": self.tokenizer.kind,
            "matmul": None,
        }
        self.rows: List[Dict[str, Any]] = []
        self.fatal: Optional[str] = None

    @staticmethod
    def _device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        return dev

    # -- what runs -------------------------------------------------------------------------------------
    def dtype_policy_text(self) -> str:
        a = self.args
        if a.dtype:
            text = ",".join(a.dtype)
            if a.fp32_backends and "fp32" in a.dtype:
                text += f" (fp32 only for {','.join(a.fp32_backends)})"
            return text
        if self.device.type == "cuda":
            return "bf16 autocast; fp32 also for the reference pretraining steps"
        return "fp32"

    def dtypes_for(self, group: str, backend: Optional[str]) -> List[str]:
        a = self.args
        if a.dtype:
            out = list(a.dtype)
            if "fp32" in out and a.fp32_backends:
                who = backend if backend is not None else "peers"
                if who not in a.fp32_backends:
                    out.remove("fp32")
            return out
        if self.device.type == "cuda":
            if backend == "reference" and group in ("pretrain", "pretrain_large"):
                return ["fp32", "bf16"]
            return ["bf16"]
        return ["fp32"]

    def execution_variants(self, w: Workload, backend: Optional[str]) -> List[str]:
        """How each case runs: "eager", "compile" (``--compile``), "graph" (``--cuda-graph``) and, with
        both, "compile+graph".
        The reference path always runs eagerly, as the original does."""
        if backend == "reference":
            return ["eager"]
        out = ["eager"] if self.args.compile != "only" and self.args.cuda_graph != "only" else []
        if self.args.compile != "off" and w.supports_compile:
            out.append("compile")
        graphs = self.args.cuda_graph != "off" and w.supports_graph and self.device.type == "cuda"
        if graphs:
            out.append("graph")
        if graphs and self.args.compile != "off" and w.supports_compile:
            out.append("compile+graph")  # Inductor's fused kernels, replayed as one graph
        return out or ["eager"]

    def plan(self) -> List[Tuple[str, List[Tuple[Workload, Optional[str], str, int, str]]]]:
        """[(group, [(workload, backend or None, dtype, batch, execution), ...]), ...] in run order."""
        plan = []
        for group in self.groups:
            wls = group_workloads(group, self.ctx, self.patterns, self.peers)
            cases = []
            # One model at a time (its cases, then it is freed), so peak memory is its own.
            for model_key in dict.fromkeys(w.model_key for w in wls):
                mws = [w for w in wls if w.model_key == model_key]
                for variant in dict.fromkeys(w.variant for w in mws):
                    ws = [w for w in mws if w.variant == variant]
                    for batch in self.batches[group]:
                        for dtype in ("fp32", "bf16"):
                            for w in ws:
                                for backend in (self.backends if w.uses_backends else [None]):
                                    if dtype in self.dtypes_for(group, backend):
                                        for execution in self.execution_variants(w, backend):
                                            cases.append((w, backend, dtype, batch, execution))
            plan.append((group, cases))
        return plan

    # -- one case --------------------------------------------------------------------------------------
    def remaining(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def run_case(self, w: Workload, backend: Optional[str], dtype: str, batch: int, execution: str,
                 inputs_cache: Dict[Any, Any], progress: Progress) -> Dict[str, Any]:
        w.execution, w.compile_mode = execution, self.args.compile_mode
        row: Dict[str, Any] = {
            "group": w.group, "variant": w.variant, "impl": w.impl + w.execution_suffix,
            "backend": backend if w.uses_backends else w.peer_backend, "label": None,
            "dtype": dtype, "batch": batch, "unit": w.unit, "status": "ok", "reason": None,
        }
        tag = row["backend"]
        progress.start(f"{w.group} {w.variant} {row['impl']}{'[' + tag + ']' if tag else ''} {dtype} b={batch}")
        rem = self.remaining()
        if (rem is not None and rem <= 0) or self.fatal:
            why = self.fatal or "time budget exhausted"
            row.update(status="skipped", reason=why)
            row["label"] = self._label(w, backend)
            progress.end(f"skipped ({why[:120]})")
            return row
        try:
            w.dtype = dtype
            w.ensure_setup()
            row["label"] = self._label(w, backend)
            row["shape"] = w.shape(batch)
            key = (w.input_key(), batch, dtype if w.inputs_depend_on_dtype else None)
            if key not in inputs_cache:
                inputs_cache[key] = w.make_inputs(batch, self.input_sets)
            sets = inputs_cache[key]
            w.begin_case()
            mem_kind = timing.reset_peak_memory(self.device)
            used: Dict[str, Dict[str, int]] = {}
            warm_ms: List[float] = []
            with backend_scope(backend, self.args.strict_backends):
                for i in range(self.warmup):
                    inp = sets[i % len(sets)]
                    if i == 0 and execution == "eager":  # (tracing would be compiled or captured in)
                        with trace_ops() as counts:
                            t = timing.time_step(lambda: w.step(inp), self.device)
                        used = {op: dict(c) for op, c in counts.items()}
                        reason = self._backend_unused(backend, used)
                        if reason:
                            row.update(status="skipped", reason=reason, ops_used=used)
                            progress.end(f"skipped ({reason})")
                            return row
                    else:
                        t = timing.time_step(lambda: w.step(inp), self.device)
                    warm_ms.append(t["ms"])
                    progress.step("warm-up", i + 1, self.warmup, t["ms"])
                n = self._n_steps(warm_ms)
                times: List[float] = []
                walls: List[float] = []
                for i in range(n):
                    inp = sets[(self.warmup + i) % len(sets)]
                    t = timing.time_step(lambda: w.step(inp), self.device)
                    times.append(t["ms"])
                    walls.append(t["wall_ms"])
                    progress.step("step", i + 1, n, t["ms"])
            peak = timing.peak_memory(self.device, mem_kind)
            stats = timing.summarize(times)
            median_s = stats["median_ms"] * 1e-3
            flops_step = w.flops(batch)
            row.update(stats)
            row.update({
                "steps": n, "warmup": self.warmup, "input_sets": len(sets), "times_ms": times,
                "warmup_ms": warm_ms, "wall_median_ms": timing.percentile(walls, 50),
                "items_per_step": w.items(batch), "throughput": w.items(batch) / median_s,
                "flops_per_step": flops_step, "tflops": flops_step / median_s / 1e12 if flops_step else None,
                "peak_mem_bytes": peak, "mem_kind": mem_kind, "ops_used": used,
            })
            details = w.details(batch)
            if details:
                row["details"] = details
            matmul = self.meta.get("matmul") or {}
            if row["tflops"] and matmul.get("tflops"):
                row["mfu"] = row["tflops"] / matmul["tflops"]
            progress.end(f"{stats['median_ms']:.2f} ms, {row['throughput']:.1f} {w.unit}"
                         + (f", peak {peak / 2**30:.2f} GiB" if peak and self.device.type == "cuda" else ""))
        except Exception as exc:  # record, free, continue
            status, reason = self._classify(exc)
            row.update(status=status, reason=reason)
            if self.device.type == "cuda" and any(t in reason for t in ("CUDA error", "device-side assert",
                                                                       "illegal memory access")):
                self.fatal = f"the CUDA context is unusable after an earlier error ({reason[:160]})"
            if row["label"] is None:
                row["label"] = self._label(w, backend)
            progress.end(f"{status}: {reason[:200]}")
        if row["status"] != "ok":
            try:
                w.cleanup()
            except Exception:
                pass
            if row["status"] == "oom":
                inputs_cache.clear()
                timing.free_memory(self.device)
        return row

    @staticmethod
    def _label(w: Workload, backend: Optional[str]) -> str:
        base = backend if w.uses_backends and backend else w.label
        return base + w.execution_suffix

    @staticmethod
    def _backend_unused(backend: Optional[str], used: Dict[str, Dict[str, int]]) -> Optional[str]:
        if backend in (None, "reference", ops.AUTO):
            return None
        if any(backend in per_op for per_op in used.values()):
            return None
        return f"backend {backend!r} supports none of this workload's op calls (all would run on reference)"

    def _n_steps(self, warm_ms: List[float]) -> int:
        est_s = max(1e-6, warm_ms[-1] * 1e-3)
        n = self.steps
        budgets = [b for b in (self.max_case_s, self.remaining()) if b is not None]
        for budget in budgets:
            n = min(n, max(3, int(budget / est_s)))
        return max(1, min(n, self.steps))

    @staticmethod
    def _classify(exc: BaseException) -> Tuple[str, str]:
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        if timing.is_oom(exc):
            return "oom", text
        if isinstance(exc, blip_fast.BackendUnavailableError) or any(
                t in str(exc) for t in ("No available kernel", "No viable backend")):
            return "unsupported", text
        if isinstance(exc, ImportError):
            return "skipped", text
        return "error", text

    # -- whole run -------------------------------------------------------------------------------------
    def measure_matmul(self) -> None:
        if self.device.type != "cuda" or self.args.no_matmul:
            return
        try:
            self.meta["matmul"] = timing.matmul_rate(self.device)
            sys.stderr.write(f"bf16 matmul 8192^3: {self.meta['matmul']['tflops']:.0f} TFLOP/s (median)\n")
        except Exception as exc:
            self.meta["matmul"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    def data(self) -> Dict[str, Any]:
        report.annotate(self.rows)
        return {"meta": self.meta, "results": self.rows}

    def save_json(self) -> str:
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, "results.json")
        report.write_json(self.data(), path)
        return path

    def run(self) -> int:
        plan = self.plan()
        total = sum(len(c) for _, c in plan)
        if self.args.list:
            for group, cases in plan:
                print(f"{group}:")
                for w, backend, dtype, batch, execution in cases:
                    w.execution = execution
                    label = self._label(w, backend)
                    print(f"  {w.variant:28s} {label:40s} {dtype:5s} b={batch}")
            print(f"{total} cases")
            torch.set_num_threads(self._threads_before)
            return 0
        os.makedirs(self.out, exist_ok=True)
        gc.freeze()  # the imported modules' objects: keeps every later gc.collect() short
        sys.stderr.write(f"blip_fast bench: {self.device} ({self.meta.get('device_name')}), sizes={self.sizes.name}, "
                         f"backends={','.join(self.backends)}, peers={','.join(self.peers) or 'none'}, "
                         f"{total} cases -> {self.out}\n")
        for name, why in {**{k: v for k, v in self.backend_status.items() if v},
                          **self.meta["peers_unavailable"]}.items():
            sys.stderr.write(f"  not run: {name}: {why}\n")
        self.measure_matmul()
        self.save_json()
        progress = Progress(total)
        try:
            for group, cases in plan:
                inputs_cache: Dict[Any, Any] = {}
                last = None
                for i, (w, backend, dtype, batch, execution) in enumerate(cases):
                    if (w.model_key, w.variant, batch) != last:
                        inputs_cache.clear()
                        last = (w.model_key, w.variant, batch)
                    self.rows.append(self.run_case(w, backend, dtype, batch, execution, inputs_cache, progress))
                    self.save_json()
                    if w.model_key is not None and all(c[0].model_key != w.model_key for c in cases[i + 1:]):
                        inputs_cache.clear()
                        for done in {id(c[0]): c[0] for c in cases if c[0].model_key == w.model_key}.values():
                            done.teardown()
                        self.ctx.drop(w.model_key)
                        timing.free_memory(self.device)
                inputs_cache.clear()
                for w in {id(c[0]): c[0] for c in cases}.values():
                    w.teardown()
                self.ctx.clear()
                timing.free_memory(self.device)
                group_rows = [r for r in self.rows if r["group"] == group]
                if group_rows:
                    report.annotate(self.rows)
                    print(report.console_table(group, group_rows, self.device.type), flush=True)
        finally:
            gc.unfreeze()
            torch.set_num_threads(self._threads_before)
            path = self.save_json()
            files = report.write_reports(self.data(), self.out, plots=not self.args.no_plots)
            sys.stderr.write("wrote " + ", ".join([path] + files) + "\n")
        return 0


def main(argv: Optional[List[str]] = None, prog: str = "python -m benchmarks") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.compare:
        return compare_mod.compare_files(args.compare[0], args.compare[1], args.threshold)
    if args.report_from:
        with open(args.report_from, encoding="utf-8") as f:
            loaded = json.load(f)
        out = args.out if args.out != "bench_out" else os.path.dirname(os.path.abspath(args.report_from))
        files = report.write_reports(loaded, out, plots=not args.no_plots)
        if args.print_tables:
            rows = loaded["results"]
            for group in dict.fromkeys(r["group"] for r in rows):
                print(report.console_table(group, [r for r in rows if r["group"] == group],
                                           loaded["meta"].get("device", "cpu")))
        print("wrote " + ", ".join(files))
        return 0
    return Runner(args, argv, prog).run()
