"""Weak scaling of the BLIP_Pretrain training step over GPUs (torchrun, NCCL, DDP and FSDP2).

One command runs every measurement and writes ``results.json``, ``table.md`` and one log per run
under ``--out``::

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python -m benchmarks.scaling --out "$OUT/scaling"

It launches, one after another, ``torchrun --standalone --nproc_per_node=N -m benchmarks.scaling
--worker ...`` for N in ``--gpus`` (default 1,2,4, capped at the GPUs present) with DDP and ViT-B/16
at 224 px, then one FSDP2 run with ViT-L/16 on all of them. Each run: batch ``--batch`` per GPU,
bf16 autocast, AdamW, queue 57600, synthetic images and pre-tokenised captions (different on every
rank), ``--warmup`` steps, then ``--steps`` timed steps (each ends with a device synchronisation).

What each run records, to show where the time goes when scaling falls short:
- per-GPU and global throughput, median / p90 step time, peak memory, model FLOP utilisation;
- DDP: the median step time with gradient sync off (``no_sync``: same work, no all-reduce); the
  difference is the communication that backward did not hide;
- from a ``torch.profiler`` trace of a few steps: GPU time in NCCL kernels per step, and the part
  of it during which no compute kernel ran (exposed communication);
- the slowest rank's median step time over the fastest's (stragglers);
- the number of host synchronisations in one step (``torch.cuda.set_sync_debug_mode``).

Weak-scaling efficiency at N GPUs = per-GPU throughput at N / per-GPU throughput at 1.
``--device cpu --tiny`` runs the same code on CPU processes with gloo (a smoke test).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .timing import synchronize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# -- worker (one process per GPU, under torchrun) ---------------------------------------------------
def _interval_union(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    merged: List[Tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: List[Tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _subtract(a: List[Tuple[float, float]], b: List[Tuple[float, float]]) -> float:
    """Length of ``a`` not covered by ``b`` (both merged, sorted)."""
    exposed, j = 0.0, 0
    for start, end in a:
        cursor = start
        while j < len(b) and b[j][1] <= cursor:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                exposed += b[k][0] - cursor
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            exposed += end - cursor
    return exposed


def comm_profile(events: Sequence[Any], n_steps: int) -> Dict[str, float]:
    """GPU kernel time per step from profiler events: NCCL kernels, compute kernels, and NCCL
    time not overlapped by any compute kernel (milliseconds)."""
    comm, compute = [], []
    for evt in events:
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        span = (evt.time_range.start, evt.time_range.end)
        (comm if "nccl" in evt.name.lower() else compute).append(span)
    comm_u, compute_u = _interval_union(comm), _interval_union(compute)
    return {"nccl_ms_per_step": _length(comm_u) / 1e3 / n_steps,
            "compute_ms_per_step": _length(compute_u) / 1e3 / n_steps,
            "exposed_nccl_ms_per_step": _subtract(comm_u, compute_u) / 1e3 / n_steps}


def count_host_syncs(step) -> Optional[int]:
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_worker(args: argparse.Namespace) -> None:
    import blip_fast
    from blip_fast import parallel
    from blip_fast.cuda_graph import DDP_CAPTURE_WARMUP
    from blip_fast.train.graphed_step import GraphedForwardBackward
    from blip_fast.distributed import destroy_distributed, init_distributed, seed_everything

    from . import data, flops
    from .config import FULL, TINY

    from blip_fast.distributed import is_dist_avail_and_initialized

    owns_group = not is_dist_avail_and_initialized()
    env = init_distributed(device=args.device)
    if args.dump_stacks_after > 0:  # a hang shows where every rank waits (in the torchrun log)
        faulthandler.dump_traceback_later(args.dump_stacks_after, exit=True)
    t_begin = time.perf_counter()

    def stage(name: str) -> None:
        print(f"[rank {env.rank}] {name} at {time.perf_counter() - t_begin:.1f} s", file=sys.stderr, flush=True)

    device = env.device
    sizes = TINY if args.tiny else FULL
    vit = sizes.vit_large if args.vit == "large" else sizes.vit_base
    vit_dims = sizes.vit_large_dims if args.vit == "large" else sizes.vit_base_dims
    if args.backend:
        blip_fast.set_backend(args.backend)
    seed_everything(0, per_rank=False)
    with torch.device(device):
        model = blip_fast.blip_pretrain(image_size=sizes.pretrain_image, vit=vit, queue_size=sizes.queue_size,
                                        **({} if sizes.med is None else {"med_config": dict(sizes.med)}))
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mp = None if args.dtype == "fp32" else args.dtype
    wrapped = parallel.wrap_model(model, args.strategy, device, mixed_precision=mp, static_graph=args.static_graph,
                                  cuda_graph=args.cuda_graph)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
    seed_everything(0)  # per rank: dropout masks, hard-negative draws
    tokenizer = data.Tokenizer("auto")
    sets = data.image_text_sets(tokenizer, 4, args.batch, sizes.pretrain_image, sizes.pretrain_len, device,
                                seed=1000 * (env.rank + 1))
    state = {"i": 0, "graph": None}

    def step(sync: bool = True) -> None:
        image, text = sets[state["i"] % len(sets)]
        state["i"] += 1
        if args.cuda_graph:  # forward + backward (all-reduce included) replayed; the optimiser eager
            if state["graph"] is None:
                state["graph"] = GraphedForwardBackward(wrapped, params, image, text, 0.4,
                                                        lambda: parallel.autocast(device, mp),
                                                        warmup=DDP_CAPTURE_WARMUP)
                stage("graph captured")
            state["graph"](image, text, 0.4)
            optimizer.step()
            return
        with parallel.grad_sync(wrapped, enabled=sync):
            with parallel.autocast(device, mp):
                loss_ita, loss_itm, loss_lm = wrapped(image, text, alpha=0.4)
            (loss_ita + loss_itm + loss_lm).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(n: int, sync: bool = True) -> List[float]:
        times = []
        for _ in range(n):
            synchronize(device)
            t0 = time.perf_counter()
            step(sync)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return times

    stage("model built")
    t_start = time.perf_counter()
    timed(args.warmup)
    warmup_s = time.perf_counter() - t_start
    stage("warm-up done")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(args.steps)
    # a captured step always all-reduces: no no_sync comparison (the profile shows exposed NCCL time)
    no_sync_times = timed(args.no_sync_steps, sync=False) \
        if args.strategy == "ddp" and env.world_size > 1 and not args.cuda_graph else []
    stage("timed steps done")
    profile: Dict[str, float] = {}
    if device.type == "cuda" and args.profile_steps > 0:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed(args.profile_steps)
        profile = comm_profile(prof.events(), args.profile_steps)
    stage("profile done")
    host_syncs = count_host_syncs(step) if device.type == "cuda" else None

    median = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(0.9 * len(times)))]
    per_rank = [median]
    if env.distributed:
        per_rank = [None] * env.world_size
        torch.distributed.all_gather_object(per_rank, median)
    step_flops = flops.pretrain_step_flops(vit_dims, sizes.text_dims, sizes.pretrain_image, sizes.pretrain_len,
                                           args.batch, sizes.queue_size)["total"]
    result = {
        "strategy": args.strategy, "vit": args.vit, "world_size": env.world_size, "batch_per_gpu": args.batch,
        "global_batch": args.batch * env.world_size, "dtype": args.dtype, "backend": blip_fast.get_backend(),
        "image_size": sizes.pretrain_image, "queue_size": sizes.queue_size, "sizes": sizes.name,
        "trainable_params": n_params, "static_graph": args.static_graph, "cuda_graph": args.cuda_graph,
        "steps": args.steps, "warmup": args.warmup, "warmup_s": warmup_s,
        "median_step_s": median, "p90_step_s": p90, "step_times_s": times,
        "per_gpu_img_s": args.batch / median, "global_img_s": args.batch * env.world_size / median,
        "tflops_per_gpu": step_flops / median / 1e12,
        "no_sync_median_step_s": statistics.median(no_sync_times) if no_sync_times else None,
        "per_rank_median_step_s": per_rank, "straggler_ratio": max(per_rank) / min(per_rank),
        "host_syncs_per_step": host_syncs,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        **profile,
    }
    if result["no_sync_median_step_s"] is not None:
        result["exposed_comm_s"] = median - result["no_sync_median_step_s"]
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    result["torch"] = torch.__version__
    if device.type == "cuda":
        version = torch.cuda.nccl.version()
        result["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    if env.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}), flush=True)
    # A graph holding captured collectives must go before its process group does (else the
    # communicator's teardown waits on it forever).
    state["graph"] = None
    synchronize(device)
    if owns_group:
        destroy_distributed()
    faulthandler.cancel_dump_traceback_later()


# -- driver -------------------------------------------------------------------------------------------
def launch(n_procs: int, worker_args: List[str], log_path: str, timeout: float) -> Tuple[int, float]:
    """Run one torchrun job; its output goes to ``log_path``. Returns (exit code, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}",
           "-m", "benchmarks.scaling", "--worker", *worker_args]
    env = dict(os.environ)
    env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on these machines
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("OMP_NUM_THREADS", "4")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - t0


def efficiency_table(runs: List[Dict[str, Any]]) -> str:
    """Markdown: one row per run, weak-scaling efficiency against the 1-GPU run of its kind."""
    kind = lambda r: (r["strategy"], r["vit"], bool(r.get("cuda_graph")))  # noqa: E731
    base = {kind(r): r["per_gpu_img_s"] for r in runs if r.get("world_size") == 1 and "error" not in r}
    lines = ["| strategy | ViT | GPUs | batch/GPU | step (ms, median) | img/s per GPU | img/s total | weak-scaling eff. "
             "| no_sync step (ms) | NCCL ms/step (exposed) | slowest/fastest rank | host syncs/step | peak GiB "
             "| TFLOP/s per GPU |",
             "|" + "---|" * 14]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['vit']} | {r['world_size']} | | failed: {r['error']} |" + " |" * 9)
            continue
        eff = r["per_gpu_img_s"] / base[kind(r)] if kind(r) in base else None
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        nccl = "" if "nccl_ms_per_step" not in r else \
            f"{r['nccl_ms_per_step']:.1f} ({r['exposed_nccl_ms_per_step']:.1f})"
        no_sync = r.get("no_sync_median_step_s")
        lines.append(
            f"| {r['strategy']}{' + graph' if r.get('cuda_graph') else ''} | {r['vit']} | {r['world_size']} "
            f"| {r['batch_per_gpu']} | {1e3 * r['median_step_s']:.1f} "
            f"| {r['per_gpu_img_s']:.1f} | {r['global_img_s']:.1f} | {fmt(eff, '.3f')} "
            f"| {fmt(None if no_sync is None else 1e3 * no_sync, '.1f')} | {nccl} | {r['straggler_ratio']:.3f} "
            f"| {fmt(r.get('host_syncs_per_step'), 'd')} | {fmt(r.get('peak_memory_gib'), '.1f')} "
            f"| {r['tflops_per_gpu']:.1f} |")
    return "\n".join(lines)


def run_driver(args: argparse.Namespace) -> int:
    os.makedirs(args.out, exist_ok=True)
    available = torch.cuda.device_count() if args.device == "cuda" else max(int(g) for g in args.gpus.split(","))
    if available == 0:
        print("no CUDA GPU visible: run on a GPU machine, or pass --device cpu --tiny for a smoke test")
        return 2
    sizes = sorted({int(g) for g in args.gpus.split(",") if int(g) <= available})
    common = ["--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--no-sync-steps", str(args.no_sync_steps), "--profile-steps",
              str(args.profile_steps), "--dtype", args.dtype, "--dump-stacks-after", str(args.dump_stacks_after)] \
        + (["--tiny"] if args.tiny else []) \
        + (["--backend", args.backend] if args.backend else [])
    plan = [("ddp", "base", n, args.batch) for n in sizes]
    if args.fsdp_vit != "none":
        plan.append(("fsdp", args.fsdp_vit, max(sizes), args.fsdp_batch))
    runs = []
    for strategy, vit, n, batch in plan:
        name = f"{strategy}_{vit}_{n}gpu"
        json_path = os.path.join(args.out, name + ".json")
        if os.path.exists(json_path):
            os.remove(json_path)
        worker_args = common + ["--strategy", strategy, "--vit", vit, "--json", json_path] \
            + (["--cuda-graph"] if args.cuda_graph and strategy == "ddp" else [])
        worker_args[worker_args.index("--batch") + 1] = str(batch)
        code, seconds = launch(n, worker_args, os.path.join(args.out, name + ".log"), args.timeout)
        if code == 0 and os.path.exists(json_path):
            with open(json_path) as f:
                run = json.load(f)
            run["wall_s"] = seconds
        else:
            run = {"strategy": strategy, "vit": vit, "world_size": n, "batch_per_gpu": batch,
                   "error": f"exit {code} after {seconds:.0f} s, see {name}.log", "wall_s": seconds}
        runs.append(run)
        print(f"{name}: " + (run.get("error") or f"{run['per_gpu_img_s']:.1f} img/s per GPU, "
                                                  f"median step {1e3 * run['median_step_s']:.1f} ms"), flush=True)
    table = efficiency_table(runs)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs}, f,
                  indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0 if all("error" not in r for r in runs) else 1


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="scaling_out", help="driver: output folder")
    p.add_argument("--gpus", default="1,2,4", help="driver: world sizes for the DDP runs (capped at the GPUs present)")
    p.add_argument("--fsdp-vit", default="large", choices=["base", "large", "none"],
                   help="driver: ViT of the FSDP2 run on all GPUs ('none' skips it)")
    p.add_argument("--fsdp-batch", type=int, default=64, help="driver: batch per GPU of the FSDP2 run")
    p.add_argument("--timeout", type=float, default=180, help="driver: seconds allowed per torchrun job")
    p.add_argument("--worker", action="store_true", help="run as one torchrun process (the driver does this)")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "none"])
    p.add_argument("--vit", default="base", choices=["base", "large"])
    p.add_argument("--batch", type=int, default=64, help="images per GPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-sync-steps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--backend", default=None, help="op backend (default: auto)")
    p.add_argument("--static-graph", action="store_true", help="DDP static_graph=True")
    p.add_argument("--cuda-graph", action="store_true",
                   help="DDP runs: replay forward + backward (with the queue all-gathers and the gradient "
                        "all-reduce) as one CUDA graph; the FSDP run stays eager")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny model sizes (CPU smoke test)")
    p.add_argument("--json", default="scaling.json", help="worker: where rank 0 writes its result")
    p.add_argument("--dump-stacks-after", type=float, default=0.0,
                   help="worker: print every thread's Python stack and exit after this many seconds (hangs)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
