"""The pretraining job's configuration: BLIP's ``configs/pretrain.yaml`` keys plus the job's own.

A config is a YAML file of top-level keys (see ``blip_fast/configs/pretrain.yaml``), read into
:class:`PretrainConfig`. Unknown keys are errors (with the closest known key suggested); numbers
written as ``3e-4`` (a string to YAML 1.1) are accepted. ``apply_overrides`` sets ``key=value``
pairs from the command line, with dotted keys for nested dicts (``vit.depth=4``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Sequence, Union

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DATASETS = ("synthetic", "json", "shards")
AMP_MODES = ("none", "bf16")


@dataclass
class PretrainConfig:
    """Every key of a pretraining config. The first group mirrors BLIP's ``configs/pretrain.yaml``."""

    # -- BLIP's pretrain.yaml ------------------------------------------------------------------
    train_file: List[str] = field(default_factory=list)  #: JSON annotation files (paths or globs)
    laion_path: str = ""            #: folder of JSON files, one added per epoch (files[epoch % n])
    vit: Union[str, Dict[str, Any]] = "base"  #: 'base', 'large' or VisionTransformer kwargs
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: int = 0
    image_size: int = 224
    batch_size: int = 75            #: per rank, as in the original
    queue_size: int = 57600
    alpha: float = 0.4
    weight_decay: float = 0.05
    init_lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    lr_decay_rate: float = 0.9
    max_epoch: int = 20
    warmup_steps: int = 3000

    # -- model (blip_pretrain's other arguments) ------------------------------------------------
    med_config: Union[str, Dict[str, Any], None] = "bert_config.json"  #: path, shipped name or dict
    embed_dim: int = 256
    momentum: float = 0.995
    pretrained: str = ""            #: checkpoint (path or URL) to start from
    backend: str = "auto"           #: op backend: auto, reference, sdpa, triton, ...

    # -- data ----------------------------------------------------------------------------------
    dataset: str = "json"           #: 'json' (train_file), 'shards' (train_shards) or 'synthetic'
    train_shards: List[str] = field(default_factory=list)  #: tar shards (paths, globs, {000..099})
    image_root: str = ""            #: prefix for relative image paths in train_file / eval_file
    min_scale: float = 0.2          #: RandomResizedCrop scale (0.2 in BLIP's pretrain.py)
    randaugment: bool = True        #: RandomAugment(2, 5, ...) after crop and flip
    max_words: int = 30             #: pre_caption word limit
    synthetic: Dict[str, Any] = field(default_factory=lambda: {
        "train_size": 100000, "eval_size": 200, "max_objects": 2})
    num_workers: int = 4
    prefetch_factor: int = 4
    seed: int = 42

    # -- schedule details ----------------------------------------------------------------------
    alpha_ramp_epochs: float = 2.0  #: alpha * min(1, progress / ramp): 2 epochs in BLIP's pretrain.py
    max_steps: int = 0              #: stop after this many steps in all (0: run max_epoch epochs)
    grad_clip: float = 0.0          #: clip the gradient norm (0: off, as the original)

    # -- precision and robustness --------------------------------------------------------------
    amp: str = "none"               #: 'none' (float32) or 'bf16' (autocast, float32 weights)
    cuda_graph: bool = False        #: replay forward + backward (+ DDP all-reduce) as one CUDA graph (no vit_grad_ckpt)
    nonfinite_patience: int = 5     #: stop after this many non-finite steps in a row

    # -- evaluation during training -------------------------------------------------------------
    eval_file: str = ""             #: JSON annotations for held-out retrieval ('' + synthetic: built-in)
    eval_every_epochs: int = 1      #: 0: never
    eval_at_start: bool = False     #: also evaluate before the first step (shows the chance level)
    k_test: int = 128               #: ITM re-ranks the top k_test of the ITC ranking
    eval_itm: str = "final"         #: ITM re-ranking: 'always', 'final' (last epoch) or 'never'
    eval_batch_size: int = 64

    # -- output --------------------------------------------------------------------------------
    log_every: int = 10             #: JSONL record every N steps
    print_every: int = 50           #: progress line every N steps when the bar is off
    checkpoint_every: int = 1000    #: steps between checkpoint_last.pth writes (0: epoch ends only)
    save_epoch_checkpoints: bool = True  #: also keep checkpoint_XX.pth per epoch, as the original
    plot: bool = True               #: loss_curve.png at the end (needs matplotlib)
    progress_bar: str = "auto"      #: 'auto' (on a terminal), 'on', 'off'

    # -- testing knobs -------------------------------------------------------------------------
    fault_injection: Dict[str, Any] = field(default_factory=dict)  #: nan_steps: [...], step_sleep: s

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> "PretrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}; known keys: {', '.join(known)}")
        defaults = cls()
        kwargs = {k: _coerce(k, v, getattr(defaults, k), where) for k, v in values.items()}
        cfg = cls(**kwargs)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"{where}: {msg}")
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r} (fp16 is not supported: "
                                    f"use bf16 on GPUs that have it)")
        need(self.batch_size >= 2, f"batch_size must be at least 2 (hard negatives come from the other samples), "
                                   f"got {self.batch_size}")
        need(self.queue_size >= self.batch_size, f"queue_size {self.queue_size} < batch_size {self.batch_size}")
        need(self.max_epoch >= 1, f"max_epoch must be >= 1, got {self.max_epoch}")
        need(self.warmup_steps >= 1, f"warmup_steps must be >= 1, got {self.warmup_steps}")
        need(0 < self.min_scale <= 1, f"min_scale must be in (0, 1], got {self.min_scale}")
        need(self.eval_itm in ("always", "final", "never"), f"eval_itm must be always/final/never, got {self.eval_itm!r}")
        need(self.progress_bar in ("auto", "on", "off"), f"progress_bar must be auto/on/off, got {self.progress_bar!r}")
        need(self.nonfinite_patience >= 1, "nonfinite_patience must be >= 1")
        need(self.log_every >= 1 and self.print_every >= 1, "log_every and print_every must be >= 1")
        need(self.seed >= 0, f"seed must be non-negative, got {self.seed}")
        if self.dataset == "json":
            need(bool(self.train_file) or bool(self.laion_path),
                 "dataset 'json' needs train_file (BLIP-format JSON annotation files); or use dataset=synthetic")
        if self.dataset == "shards":
            need(bool(self.train_shards), "dataset 'shards' needs train_shards (tar files, globs or brace ranges)")
        unknown_faults = set(self.fault_injection) - {"nan_steps", "step_sleep"}
        need(not unknown_faults, f"fault_injection knows nan_steps and step_sleep, not {sorted(unknown_faults)}")


def _coerce(key: str, value: Any, default: Any, where: str) -> Any:
    """``value`` as the type of ``default`` (YAML 1.1 reads ``3e-4`` as a string)."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [value] if value else []
            return list(value)
        if key == "vit":
            if not isinstance(value, (str, dict)):
                raise ValueError
            return value
        if key == "med_config":
            if value is not None and not isinstance(value, (str, dict)):
                raise ValueError
            return value
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError
            merged = dict(default)
            merged.update(value)
            return merged
        if isinstance(default, str):
            if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
                return "on" if value else "off"
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{where}: {key} = {value!r} is not a valid {type(default).__name__}")


def resolve_config_path(name: str) -> str:
    """A config file path, or the name of a shipped config (``pretrain``, ``pretrain_tiny.yaml``)."""
    if os.path.isfile(name):
        return name
    for candidate in (name, name + ".yaml"):
        path = os.path.join(CONFIG_DIR, candidate)
        if os.path.isfile(path):
            return path
    shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise FileNotFoundError(f"config {name!r} is neither a file nor a shipped config ({', '.join(shipped)})")


def read_yaml(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a mapping of keys to values, got {type(values).__name__}")
    return values


def load_config(name_or_path: str = "pretrain_tiny", overrides: Sequence[str] = ()) -> PretrainConfig:
    """Read a config file (or a shipped config by name) and apply ``key=value`` overrides."""
    path = resolve_config_path(name_or_path)
    values = read_yaml(path)
    values = apply_overrides(values, overrides)
    return PretrainConfig.from_dict(values, where=path)


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML (``8`` -> int, ``3e-4`` -> float, ``[a, b]`` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            return value
    return value


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``['batch_size=8', 'vit.depth=2']`` applied to a copy of ``values``."""
    values = copy.deepcopy(values)
    defaults = PretrainConfig().to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, _, text = item.partition("=")
        key = key.strip().replace("-", "_")
        parts = key.split(".")
        if parts[0] not in defaults:
            close = difflib.get_close_matches(parts[0], defaults, n=1)
            raise ValueError(f"override {item!r}: unknown key {parts[0]!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        target = values
        for i, part in enumerate(parts[:-1]):
            nxt = target.get(part)
            if nxt is None and i == 0 and isinstance(defaults.get(part), dict):
                nxt = dict(defaults[part])
            if not isinstance(nxt, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a mapping")
            target[part] = nxt = dict(nxt)
            target = nxt
        target[parts[-1]] = parse_value(text)
    return values


def dump_config(cfg: PretrainConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
