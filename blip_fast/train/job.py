"""The pretraining job: BLIP's ``pretrain.py`` loop with exact resume and fault handling.

Per step (as the original): set the learning rate (warm-up in epoch 0, step decay after), compute
alpha (ramped), ``loss_ita + loss_itm + loss_lm``, backward, AdamW step. Around it:

* images arrive as uint8 and are normalised on the device; captions arrive tokenised;
* non-finite losses or gradients: the optimiser step is skipped (the queue slots the step wrote are
  restored), the step is logged; after ``nonfinite_patience`` such steps in a row the job stops
  with :class:`NonFiniteLossError` and leaves the last checkpoint as it was;
* checkpoints (``checkpoint_last.pth``, atomically replaced) every ``checkpoint_every`` steps and
  at every epoch end, holding everything a resumed run needs to continue bit-for-bit;
* SIGTERM / SIGINT: checkpoint at the next step boundary, then stop (resume with ``--resume``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ..cuda_graph import DDP_CAPTURE_WARMUP
from ..data import normalize_images
from ..evaluation.retrieval import evaluate_retrieval, format_metrics
from ..models.blip import load_checkpoint
from ..models.blip_pretrain import BLIP_Pretrain, blip_pretrain
from ..tokenizer import init_tokenizer
from . import checkpointing as ckpt_io
from .config import PretrainConfig, dump_config
from .graphed_step import GraphedForwardBackward, forward_backward
from .pipeline import TrainData, build_eval_set
from .reporting import LOG_FILE, PLOT_FILE, JsonlLog, Progress, plot_losses
from .runtime import (Runtime, barrier, gather_objects, init_runtime, rng_state, seed_everything, set_rng_state,
                      shutdown, wrap_for_distributed)
from .schedule import alpha_at, build_optimizer, lr_at, set_lr

logger = logging.getLogger("blip_fast.train")

Tensor = torch.Tensor


#: Config keys that decide the data order, augmentation or schedule of a resumed run.
_EXACT_RESUME_KEYS = ("seed", "batch_size", "dataset", "train_file", "train_shards", "laion_path", "synthetic",
                      "image_size", "min_scale", "randaugment", "max_words", "init_lr", "min_lr", "warmup_lr",
                      "lr_decay_rate", "warmup_steps", "alpha", "alpha_ramp_epochs", "amp")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients."""


@dataclass
class JobResult:
    output_dir: str
    global_step: int
    epoch: int
    checkpoint: Optional[str]
    evals: List[Dict[str, Any]] = field(default_factory=list)
    last_losses: Dict[str, float] = field(default_factory=dict)
    stopped_by_signal: bool = False


def build_model(cfg: PretrainConfig, tokenizer: Any = None, load_pretrained: bool = True) -> BLIP_Pretrain:
    """BLIP_Pretrain from a config (the original's ``blip_pretrain(...)`` call plus the extra keys)."""
    model = blip_pretrain(pretrained=cfg.pretrained if load_pretrained else "", med_config=cfg.med_config,
                          image_size=cfg.image_size, vit=cfg.vit, vit_grad_ckpt=cfg.vit_grad_ckpt,
                          vit_ckpt_layer=cfg.vit_ckpt_layer, embed_dim=cfg.embed_dim, queue_size=cfg.queue_size,
                          momentum=cfg.momentum, tokenizer=tokenizer)
    if cfg.backend and cfg.backend != "auto":
        model.set_backend(cfg.backend)
    return model


class _QueueGuard:
    """Saves the queue columns a step will overwrite, to put them back if the step is skipped."""

    def __init__(self, model: BLIP_Pretrain, global_batch: int):
        self.model = model
        self.offsets = torch.arange(global_batch, device=model.queue_ptr.device)
        self.saved: Optional[tuple] = None

    def save(self) -> None:
        m = self.model
        idx = (m.queue_ptr + self.offsets) % m.queue_size
        self.saved = (m.queue_ptr.clone(), idx, m.image_queue[:, idx].clone(), m.text_queue[:, idx].clone())

    @torch.no_grad()
    def restore(self) -> None:
        ptr, idx, image_cols, text_cols = self.saved
        self.model.image_queue.index_copy_(1, idx, image_cols)
        self.model.text_queue.index_copy_(1, idx, text_cols)
        self.model.queue_ptr.copy_(ptr)


def _sample_negatives_from_finite_similarities(model: BLIP_Pretrain) -> None:
    """Make a step with non-finite activations reach the loss check instead of raising inside
    ``torch.multinomial`` ("probability tensor contains either inf, nan or element < 0") while
    drawing hard negatives: the similarities are passed through ``nan_to_num`` (the identity on
    finite values, so every normal step is unchanged); the step's losses stay non-finite and it is
    skipped on every rank."""
    sample = model.sample_hard_negatives

    def sample_finite(sim_i2t: Tensor, sim_t2i: Tensor, *args: Any, **kwargs: Any):
        return sample(torch.nan_to_num(sim_i2t), torch.nan_to_num(sim_t2i), *args, **kwargs)

    model.sample_hard_negatives = sample_finite


class PretrainJob:
    """One run of the pretraining job (``run()``); see the module docstring."""

    def __init__(self, cfg: PretrainConfig, output_dir: str, rt: Runtime, resume: str = ""):
        self.cfg, self.output_dir, self.rt = cfg, output_dir, rt
        self.device = rt.device
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.rt.is_main:
            os.makedirs(output_dir, exist_ok=True)
            dump_config(cfg, os.path.join(output_dir, "config.yaml"))
        resume_path = ckpt_io.resolve_resume(resume, output_dir)
        state = ckpt_io.read_job_checkpoint(resume_path) if resume_path else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        seed_everything(cfg.seed, per_rank=False)  # the same initial weights on every rank
        self.tokenizer = init_tokenizer()
        with torch.device(self.device):  # initialise on the device (fast for ViT-B/L on a GPU)
            self.model = build_model(cfg, self.tokenizer, load_pretrained=False)
        self.model.to(self.device)
        if state is None and cfg.pretrained:
            _, report = load_checkpoint(self.model, cfg.pretrained)
            if rt.is_main:
                logger.info("initial weights from %s\n%s", cfg.pretrained, report)
        self.model.train()
        _sample_negatives_from_finite_similarities(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg, self.device)
        self.data = TrainData(cfg, self.tokenizer, rt)
        self.eval_set = build_eval_set(cfg)
        self.global_batch = cfg.batch_size * rt.world_size
        self.queue_guard = _QueueGuard(self.model, self.global_batch)

        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.skip_counts: Counter = Counter()
        self.nonfinite_total = 0
        self.evals: List[Dict[str, Any]] = []
        self.last_checkpoint: Optional[str] = None
        self.last_checkpoint_step: Optional[int] = None
        self.resumed_from = resume_path
        if state is not None:
            self._load_state(state, resume_path)
        if cfg.cuda_graph:
            self._check_cuda_graph()
        self.ddp_model = wrap_for_distributed(self.model, rt, cuda_graph=cfg.cuda_graph)
        if state is None:
            seed_everything(cfg.seed, per_rank=True)  # seed + rank: per-rank dropout and negatives (original)
        self._stop_requested = False
        self._fault_nan = {int(s) for s in cfg.fault_injection.get("nan_steps", [])}
        self._fault_sleep = float(cfg.fault_injection.get("step_sleep", 0.0))
        self._graphed: Optional[GraphedForwardBackward] = None

    def _check_cuda_graph(self) -> None:
        problem = None
        if self.device.type != "cuda":
            problem = f"it needs a CUDA device, the job runs on {self.device}"
        elif self.cfg.vit_grad_ckpt:
            problem = "activation checkpointing (vit_grad_ckpt) is not captured; turn one of them off"
        if problem:
            raise ValueError(f"cuda_graph: {problem}. Fix: --set cuda_graph=false")

    # -- state -------------------------------------------------------------------------------------
    def _load_state(self, state: Dict[str, Any], path: str) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise RuntimeError(f"--resume {path}: the checkpoint does not fit the model this config builds "
                               f"(was the model part of the config changed?): {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        pos = state["position"]
        self.epoch, self.batch_in_epoch, self.global_step = pos["epoch"], pos["batch"], pos["global_step"]
        stats = state.get("stats", {})
        self.skip_counts = Counter(stats.get("skipped_samples", {}))
        self.nonfinite_total = int(stats.get("nonfinite_steps", 0))
        self.evals = list(stats.get("evals", []))
        saved_cfg = state.get("config") or {}
        changed = [k for k in _EXACT_RESUME_KEYS if k in saved_cfg and saved_cfg[k] != getattr(self.cfg, k)]
        if changed and self.rt.is_main:
            logger.warning("resuming with %s changed from the checkpoint's config: the run continues, but not "
                           "as the original run would have", ", ".join(changed))
        rngs = state["rng"]
        if state.get("world_size") == self.rt.world_size:
            set_rng_state(rngs[self.rt.rank])
        else:
            logger.warning("checkpoint written by %s rank(s), resuming on %d: data position mapped by samples "
                           "seen, random generators re-seeded (the run continues, not bit-for-bit)",
                           state.get("world_size"), self.rt.world_size)
            seen = self.batch_in_epoch * self.cfg.batch_size * int(state.get("world_size") or 1)
            self.batch_in_epoch = seen // self.global_batch
            seed_everything(self.cfg.seed + 7919 * self.global_step, per_rank=True)
        self.last_checkpoint, self.last_checkpoint_step = path, self.global_step
        if self.rt.is_main:
            logger.info("resumed from %s at epoch %d, batch %d (step %d)", path, self.epoch, self.batch_in_epoch,
                        self.global_step)

    def _checkpoint_obj(self, rngs: List[Any]) -> Dict[str, Any]:
        completed = self.epoch - 1 if self.batch_in_epoch < self.data.steps_per_epoch else self.epoch
        return {
            "format": ckpt_io.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.cfg.to_dict(),
            "epoch": completed,
            "position": {"epoch": self.epoch, "batch": self.batch_in_epoch, "global_step": self.global_step},
            "rng": rngs,
            "world_size": self.rt.world_size,
            "stats": {"skipped_samples": dict(self.skip_counts), "nonfinite_steps": self.nonfinite_total,
                      "evals": self.evals},
        }

    def save_checkpoint(self, epoch_file: Optional[str] = None) -> str:
        """Write checkpoint_last.pth (and ``epoch_file``) from rank 0; collective across ranks."""
        rngs = gather_objects(rng_state(), self.rt)
        last = os.path.join(self.output_dir, ckpt_io.LAST)
        if self.rt.is_main:
            obj = self._checkpoint_obj(rngs)
            start = time.perf_counter()
            if epoch_file:
                ckpt_io.save_atomic(obj, epoch_file)
                _atomic_link_or_copy(epoch_file, last)
            else:
                ckpt_io.save_atomic(obj, last)
            logger.info("checkpoint at step %d -> %s (%.1fs)", self.global_step, epoch_file or last,
                        time.perf_counter() - start)
        barrier(self.rt)
        self.last_checkpoint, self.last_checkpoint_step = last, self.global_step
        return last

    # -- one step ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self, batch: Any, alpha: float) -> Dict[str, float]:
        images = normalize_images(batch.images.to(self.device, non_blocking=True))
        text = batch.text.to(self.device, non_blocking=True)
        if self.global_step + 1 in self._fault_nan:  # numbered as logged (1-based)
            images = images * float("nan")
        self.queue_guard.save()
        if self.cfg.cuda_graph:  # gradients live in the graph's buffers: never set them to None
            if self._graphed is None:
                self._graphed = GraphedForwardBackward(
                    self.ddp_model, self.params, images, text, alpha, self._autocast,
                    warmup=DDP_CAPTURE_WARMUP if self.rt.distributed else 2)
            values = self._graphed(images, text, alpha)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            values = forward_backward(self.ddp_model, self.params, images, text, alpha, self._autocast)
        grad_norm = values[3]
        host_flags = torch.tensor([1.0 if self._stop_requested else 0.0, float(len(batch.skipped))])
        packed = torch.cat([values, (~torch.isfinite(values).all()).float().view(1),
                            host_flags.to(self.device, non_blocking=True)])
        if self.rt.distributed:
            dist.all_reduce(packed)  # sums: mean losses over ranks, any rank non-finite / stopping
        host = packed.tolist()  # the step's one host synchronisation
        n = self.rt.world_size
        nonfinite = host[4] > 0 or not all(math.isfinite(v) for v in host[:4])
        if not nonfinite:
            if self.cfg.grad_clip > 0:
                coef = torch.clamp(self.cfg.grad_clip / (grad_norm + 1e-6), max=1.0)
                torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)
            self.optimizer.step()
        else:
            if not self.cfg.cuda_graph:
                self.optimizer.zero_grad(set_to_none=True)
            self.queue_guard.restore()
        out = {"loss_ita": host[0] / n, "loss_itm": host[1] / n, "loss_lm": host[2] / n, "grad_norm": host[3] / n,
               "nonfinite": nonfinite, "stop": host[5] > 0, "skipped_samples": int(host[6])}
        out["loss"] = out["loss_ita"] + out["loss_itm"] + out["loss_lm"]
        for idx, reason, detail in batch.skipped:
            self.skip_counts[reason] += 1
            if sum(self.skip_counts.values()) <= 10:
                logger.warning("skipped sample %d (%s): %s", idx, reason, detail)
        return out

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, final: bool, tag: str, progress: Optional[Progress] = None) -> Optional[Dict[str, Any]]:
        if self.eval_set is None:
            return None
        rerank = self.cfg.eval_itm == "always" or (self.cfg.eval_itm == "final" and final)
        metrics = evaluate_retrieval(self.model, self.eval_set, self.device, k_test=self.cfg.k_test,
                                     amp=self.cfg.amp, batch_size=self.cfg.eval_batch_size, rerank=rerank)
        record = {"kind": "eval", "step": self.global_step, "epoch": self.epoch, "tag": tag, **metrics}
        self.evals.append({k: v for k, v in record.items() if isinstance(v, (int, float, str))})
        if self.rt.is_main:
            line = f"[{tag}] held-out retrieval: {format_metrics(metrics)} [{metrics['seconds']:.1f}s]"
            (progress.write if progress is not None else print)(line)
        return record

    # -- the loop ----------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> List[Any]:
        if threading.current_thread() is not threading.main_thread():
            return []
        previous = []

        def handler(signum, frame):
            if self._stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            logger.warning("signal %d: checkpointing at the next step boundary, then stopping", signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous.append((sig, signal.signal(sig, handler)))
        return previous

    def run(self) -> JobResult:
        cfg, rt = self.cfg, self.rt
        log = JsonlLog(os.path.join(self.output_dir, LOG_FILE),
                       resume_step=self.global_step if self.resumed_from else None) if rt.is_main else None
        previous_handlers = self._install_signal_handlers()
        first_loader = self.data.loader(self.epoch, min(self.batch_in_epoch, self.data.steps_per_epoch))
        total_steps = self.data.steps_per_epoch * cfg.max_epoch
        if cfg.max_steps > 0:
            total_steps = min(total_steps, cfg.max_steps)
        progress = Progress(total_steps, self.global_step, cfg.progress_bar, cfg.print_every, enabled=rt.is_main)
        if rt.is_main:
            n_params = sum(p.numel() for p in self.params)
            progress.write(
                f"pretraining {n_params / 1e6:.1f}M trainable parameters on {rt.world_size} x {self.device} "
                f"(amp {cfg.amp}): {self.data.steps_per_epoch} steps/epoch x {cfg.max_epoch} epochs, "
                f"global batch {self.global_batch}" + (f", stop at step {cfg.max_steps}" if cfg.max_steps else "")
                + f"; output {self.output_dir}")
        result = JobResult(self.output_dir, self.global_step, self.epoch, self.last_checkpoint)
        stopped = False
        nonfinite_streak = 0
        run_start = window_start = time.perf_counter()
        window_steps = 0
        samples_per_s = 0.0
        try:
            if cfg.eval_at_start and self.global_step == 0 and self.eval_set is not None:
                rec = self.evaluate(final=False, tag="before training", progress=progress)
                if log and rec:
                    log.write(rec)
            loader = first_loader
            while self.epoch < cfg.max_epoch and not stopped:
                steps_per_epoch = self.data.steps_per_epoch
                epoch_losses: List[List[float]] = []
                epoch_start = time.perf_counter()
                for batch in loader:
                    if cfg.max_steps and self.global_step >= cfg.max_steps:
                        break
                    i = self.batch_in_epoch
                    lr = lr_at(cfg, self.epoch, i)
                    set_lr(self.optimizer, lr)
                    alpha = alpha_at(cfg, self.epoch, i, steps_per_epoch)
                    out = self.train_step(batch, alpha)
                    self.global_step += 1
                    self.batch_in_epoch += 1
                    window_steps += 1
                    if out["nonfinite"]:
                        nonfinite_streak += 1
                        self.nonfinite_total += 1
                        msg = (f"step {self.global_step}: non-finite loss or gradient (ita {out['loss_ita']}, itm "
                               f"{out['loss_itm']}, lm {out['loss_lm']}, grad norm {out['grad_norm']}): step "
                               f"skipped ({nonfinite_streak} in a row)")
                        logger.warning(msg)
                        if rt.is_main:
                            progress.write("WARNING " + msg)
                    else:
                        nonfinite_streak = 0
                        epoch_losses.append([out["loss_ita"], out["loss_itm"], out["loss_lm"]])
                    now = time.perf_counter()
                    if self.global_step % cfg.log_every == 0 or out["nonfinite"]:
                        samples_per_s = window_steps * self.global_batch / max(now - window_start, 1e-9)
                        window_start, window_steps = now, 0
                        if log:
                            log.write({"kind": "step", "step": self.global_step, "epoch": self.epoch, "batch": i,
                                       "lr": lr, "alpha": alpha, **{k: out[k] for k in (
                                           "loss_ita", "loss_itm", "loss_lm", "loss", "grad_norm")},
                                       "skipped": out["nonfinite"], "samples_per_s": samples_per_s,
                                       "time": round(now - run_start, 4),
                                       "skipped_samples": dict(self.skip_counts)})
                    elif samples_per_s == 0.0 and window_steps >= 2:
                        samples_per_s = window_steps * self.global_batch / max(now - window_start, 1e-9)
                    progress.update(self.global_step, self.epoch, {**out, "lr": lr, "samples_per_s": samples_per_s})
                    if nonfinite_streak >= cfg.nonfinite_patience:
                        where = (f"the last good checkpoint is {self.last_checkpoint} (step {self.last_checkpoint_step})"
                                 if self.last_checkpoint else "no checkpoint was written before it")
                        raise NonFiniteLossError(
                            f"{nonfinite_streak} consecutive steps (up to step {self.global_step}) had non-finite "
                            f"losses or gradients; stopped without writing a checkpoint: {where}. Lower init_lr, "
                            f"train in float32 (--amp none), set grad_clip, or check the data; then resume from "
                            f"that checkpoint (--resume PATH).")
                    if out["stop"]:
                        self.save_checkpoint()
                        stopped = True
                        result.stopped_by_signal = True
                        if rt.is_main:
                            progress.write(f"stopped by a signal at step {self.global_step}; checkpoint "
                                           f"{self.last_checkpoint} (continue with --resume)")
                        break
                    if (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 and nonfinite_streak == 0
                            and self.batch_in_epoch < steps_per_epoch):  # an epoch's end checkpoints below
                        self.save_checkpoint()
                    result.last_losses = {k: out[k] for k in ("loss_ita", "loss_itm", "loss_lm", "loss")}
                    if self._fault_sleep:
                        time.sleep(self._fault_sleep)
                if stopped:
                    break
                reached_max = bool(cfg.max_steps and self.global_step >= cfg.max_steps)
                epoch_done = self.batch_in_epoch >= steps_per_epoch
                if epoch_done:
                    final = self.epoch == cfg.max_epoch - 1 or reached_max
                    if rt.is_main:
                        _epoch_summary(progress, self.epoch, epoch_losses, time.perf_counter() - epoch_start,
                                       self.global_batch, self.skip_counts)
                    if self.eval_set is not None and (final or (self.epoch + 1) % cfg.eval_every_epochs == 0):
                        rec = self.evaluate(final=final, tag=f"epoch {self.epoch}", progress=progress)
                        if log and rec:
                            log.write(rec)
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    epoch_file = (os.path.join(self.output_dir, f"checkpoint_{self.epoch - 1:02d}.pth")
                                  if cfg.save_epoch_checkpoints else None)
                    self.save_checkpoint(epoch_file)
                if reached_max:
                    if not epoch_done:
                        if self.eval_set is not None:
                            rec = self.evaluate(final=True, tag=f"step {self.global_step}", progress=progress)
                            if log and rec:
                                log.write(rec)
                        self.save_checkpoint()
                    break
                if self.epoch < cfg.max_epoch:
                    loader = self.data.loader(self.epoch, 0)
        finally:
            progress.close()
            for sig, handler in previous_handlers:
                signal.signal(sig, handler)
            if log:
                log.close()
        if rt.is_main:
            if cfg.plot:
                png = plot_losses(os.path.join(self.output_dir, LOG_FILE), os.path.join(self.output_dir, PLOT_FILE))
                if png:
                    print(f"loss curves: {png}", flush=True)
            if self.skip_counts:
                print(f"skipped samples: {dict(self.skip_counts)}", flush=True)
            print(f"done: {self.global_step} steps; checkpoint {self.last_checkpoint}; log "
                  f"{os.path.join(self.output_dir, LOG_FILE)}", flush=True)
        result.global_step, result.epoch, result.checkpoint = self.global_step, self.epoch, self.last_checkpoint
        result.evals = self.evals
        return result


def _epoch_summary(progress: Progress, epoch: int, losses: List[List[float]], seconds: float, global_batch: int,
                   skip_counts: Counter) -> None:
    if losses:
        t = torch.tensor(losses).mean(0).tolist()
        text = (f"epoch {epoch}: mean loss ita {t[0]:.4f} itm {t[1]:.4f} lm {t[2]:.4f} over {len(losses)} steps, "
                f"{len(losses) * global_batch / max(seconds, 1e-9):.1f} img/s")
    else:
        text = f"epoch {epoch}: no finite step"
    if skip_counts:
        text += f"; skipped samples so far: {dict(skip_counts)}"
    progress.write(text)


def _atomic_link_or_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def run_pretrain(cfg: PretrainConfig, output_dir: str, device: Optional[str] = None, resume: str = "") -> JobResult:
    """Run the job in this process (torchrun: one per rank). Returns a :class:`JobResult`."""
    rt = init_runtime(device)
    job = None
    try:
        job = PretrainJob(cfg, output_dir, rt, resume)
        return job.run()
    finally:
        if job is not None:
            job._graphed = None  # a graph's captured collectives must not outlive the process group
        shutdown(rt)
