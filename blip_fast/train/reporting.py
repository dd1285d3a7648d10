"""What the job shows and writes: a progress bar (tqdm when present), JSONL logs, a loss plot."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

logger = logging.getLogger("blip_fast.train")

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss_curve.png"


class JsonlLog:
    """Append-only JSON-lines log. On resume, records past the checkpoint's step are dropped (those
    steps run again)."""

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is not None and os.path.isfile(path):
            kept = [r for r in read_jsonl(path) if r.get("step", -1) <= resume_step and r.get("kind") != "end"]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        elif resume_step is None and os.path.isfile(path):
            os.replace(path, path + ".previous")
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
    return records


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{value:.3f}"


class Progress:
    """A tqdm bar on a terminal (``mode='auto'``), else a plain line every ``print_every`` steps."""

    def __init__(self, total: int, initial: int, mode: str, print_every: int, enabled: bool = True):
        self.enabled = enabled
        self.print_every = print_every
        self.total = total
        self.bar = None
        use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        if enabled and use_bar:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                self.bar = None
        self._last_print = time.perf_counter()

    def update(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        text = (f"ep {epoch} ita {_fmt(values['loss_ita'])} itm {_fmt(values['loss_itm'])} "
                f"lm {_fmt(values['loss_lm'])} lr {values['lr']:.2e} {values['samples_per_s']:.1f} img/s")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif step % self.print_every == 0 or step == self.total:
            print(f"step {step}/{self.total} {text}", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(log_path: str, out_path: str) -> Optional[str]:
    """Loss curves (and held-out recall@1 per evaluation) from the JSONL log, as a PNG. Returns the
    path, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    records = read_jsonl(log_path)
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not steps:
        return None
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    x = [r["step"] for r in steps]
    for key, label in (("loss_ita", "ITC"), ("loss_itm", "ITM"), ("loss_lm", "LM"), ("loss", "total")):
        y = [r[key] if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) else float("nan")
             for r in steps]
        ax.plot(x, y, label=label, linewidth=1.5 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("pretraining losses")
    ax.legend()
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        ex = [r["step"] for r in evals]
        for key, label in (("itc_txt_r1", "image->text R@1 (ITC)"), ("itc_img_r1", "text->image R@1 (ITC)"),
                           ("txt_r1", "image->text R@1 (ITC+ITM)"), ("img_r1", "text->image R@1 (ITC+ITM)")):
            pts = [(s, r[key]) for s, r in zip(ex, evals) if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if "chance_r1" in evals[-1]:
            ax.axhline(evals[-1]["chance_r1"], color="grey", linestyle="--", label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel("recall@1 (%)")
        ax.set_title("held-out retrieval")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
