"""``save_pretrained`` / ``from_pretrained`` for blip_fast models: a config JSON and safetensors.

A saved folder holds

* ``config.json``: ``{"blip_fast_class": "BLIP_ITM", "init_args": {...}, "tied_weights": {...},
  "blip_fast_version": ...}``: the model class and the arguments it was constructed with (a
  ``med_config`` given as a path or ``BertConfig`` is stored as the resolved dict, so the folder
  does not depend on files elsewhere);
* ``model.safetensors``: every state-dict entry once. Tensors that share storage (the tied
  encoder / decoder weights of BLIP_Pretrain, the decoder's tied LM head) are stored under their
  first key; the other keys are recorded in ``tied_weights`` (``{alias: stored key}``, also in the
  safetensors metadata), refilled on load and re-tied to one tensor where the rebuilt model does
  not tie them itself. safetensors refuses shared storage, so the ties must be undone to save.

Classes are looked up by name among the subclasses of :class:`PretrainedMixin` (a config cannot
import arbitrary code).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar, Union

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError
from ..weight_sources import resolve_folder

logger = logging.getLogger("blip_fast.models")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
M = TypeVar("M", bound="PretrainedMixin")


def _storage_key(t: torch.Tensor) -> Tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tied_weight_groups(state_dict: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """``{alias: first key}`` for state-dict entries that are the same tensor view (same storage,
    offset, shape, strides, dtype); the first key in state-dict order is the one kept."""
    first: Dict[Tuple[Any, ...], str] = {}
    ties: Dict[str, str] = {}
    for key, value in state_dict.items():
        if value.device.type == "meta":
            raise ValueError(f"{key} is on the meta device: materialise the model before saving it")
        sk = _storage_key(value)
        if sk in first:
            ties[key] = first[sk]
        else:
            first[sk] = key
    return ties


def _json_ready(name: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except TypeError as exc:
        raise TypeError(f"constructor argument {name}={value!r} cannot be written to {CONFIG_NAME}; build the "
                        f"model with JSON-serialisable arguments (str, numbers, lists, dicts) to save it") from exc
    return value


def _serialisable_init_args(cls_name: str, init_args: Dict[str, Any]) -> Dict[str, Any]:
    from .med import BertConfig, load_med_config  # med imports transformers; keep this module light
    out: Dict[str, Any] = {}
    for name, value in init_args.items():
        if name == "tokenizer":
            if value is not None and not isinstance(value, str):
                logger.info("%s: the tokenizer object is not saved; pass tokenizer=... to from_pretrained if it "
                            "is not BLIP's default", cls_name)
                value = None
            out[name] = value
        elif name.endswith("med_config") and isinstance(value, (str, os.PathLike, BertConfig)):
            out[name] = load_med_config(value).to_dict()
        else:
            out[name] = _json_ready(name, value)
    return out


class PretrainedMixin:
    """Adds :meth:`save_pretrained` and :meth:`from_pretrained` to an ``nn.Module`` model class.

    The arguments of the constructor call are recorded when the object is created, so subclasses
    need no code of their own; every argument must be JSON-serialisable at save time.
    """

    _registry: Dict[str, type] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PretrainedMixin._registry[cls.__name__] = cls

    def __new__(cls, *args: Any, **kwargs: Any):
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        except TypeError:
            init_args = None  # __init__ raises the real error (or the object is being unpickled)
        else:
            bound.apply_defaults()
            init_args = {}
            params = inspect.signature(cls.__init__).parameters
            for name, value in list(bound.arguments.items())[1:]:
                if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                    init_args.update(value)
                elif params[name].kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        init_args = None
                        break
                else:
                    init_args[name] = value
        object.__setattr__(self, "_init_args", init_args)
        return self

    @property
    def init_args(self) -> Dict[str, Any]:
        """The constructor arguments this model was built with (defaults filled in)."""
        if getattr(self, "_init_args", None) is None:
            raise RuntimeError(f"{type(self).__name__} was not built through its constructor with keyword-"
                               f"representable arguments; its configuration is unknown")
        return dict(self._init_args)

    def pretrained_config(self) -> Dict[str, Any]:
        """What ``config.json`` holds (without ``tied_weights``)."""
        from .. import __version__
        name = type(self).__name__
        return {"blip_fast_class": name, "init_args": _serialisable_init_args(name, self.init_args),
                "blip_fast_version": __version__, "format_version": FORMAT_VERSION}

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if
        needed); returns the folder. Tied tensors are stored once (see the module docstring)."""
        from safetensors.torch import save_file
        assert isinstance(self, nn.Module)
        folder = os.fspath(save_directory)
        if os.path.isfile(folder):
            raise FileExistsError(f"{folder!r} is a file; save_pretrained needs a folder")
        config = self.pretrained_config()
        state = self.state_dict()
        ties = tied_weight_groups(state)
        tensors = {k: v.detach().contiguous() for k, v in state.items() if k not in ties}
        # Distinct views of one storage (not the same view) must be copied for safetensors.
        storages: Dict[Tuple[Any, int], str] = {}
        for key, value in tensors.items():
            sk = (value.device, value.untyped_storage().data_ptr())
            if sk in storages:
                tensors[key] = value.clone()
            else:
                storages[sk] = key
        config["tied_weights"] = ties
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, WEIGHTS_NAME),
                  metadata={"format": "pt", "blip_fast_class": config["blip_fast_class"],
                            "tied_weights": json.dumps(ties)})
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=False)
            f.write("\n")
        return folder

    @classmethod
    def from_pretrained(cls: Type[M], name_or_path: Union[str, os.PathLike], *, revision: Optional[str] = None,
                        cache_dir: Optional[str] = None, local_files_only: bool = False,
                        device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                        **init_overrides: Any) -> M:
        """Rebuild a model saved with :meth:`save_pretrained`.

        ``name_or_path``: a local folder, or a Hugging Face Hub repository id fetched with
        ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``, ``local_files_only``;
        the cache is used when it holds the files). ``init_overrides`` replace saved constructor
        arguments (e.g. ``tokenizer=...``, ``vit_grad_ckpt=True``). Called on a concrete class, the
        folder must hold that class or a subclass; called on a base class, the saved class is
        built. Returns the model in eval mode (as transformers does), on ``device``, in ``dtype``
        when given. Raises :class:`~blip_fast.CheckpointError` if a weight is missing, unexpected
        or of another shape.
        """
        from safetensors import safe_open
        folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise CheckpointError(f"{folder!r} lacks {os.path.basename(path)}: not a folder written by "
                                      f"save_pretrained (for transformers' BLIP folders use "
                                      f"blip_fast.interop.from_transformers)")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        name = config.get("blip_fast_class")
        target = PretrainedMixin._registry.get(name) if isinstance(name, str) else None
        if target is None:
            raise CheckpointError(f"{config_path} names model class {name!r}, which is not a blip_fast model "
                                  f"(known: {sorted(PretrainedMixin._registry)})")
        if cls is not PretrainedMixin and not issubclass(target, cls):
            raise CheckpointError(f"{folder!r} holds a {name}, not a {cls.__name__}: load it with "
                                  f"{name}.from_pretrained (or a base class)")
        init_args = dict(config.get("init_args", {}), **init_overrides)
        model = target(**init_args)

        with safe_open(weights_path, framework="pt", device="cpu") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}
        ties: Dict[str, str] = dict(config.get("tied_weights", {}))
        _retie(model, ties)
        for alias, key in ties.items():
            if key not in state:
                raise CheckpointError(f"{weights_path}: tied weight {alias} refers to {key}, which is not stored")
            state[alias] = state[key]
        _load_exact(model, state, weights_path)
        _verify_ties(model, ties)
        model = model.to(device=device)
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model.eval()


def _retie(model: nn.Module, ties: Dict[str, str]) -> None:
    """Make every recorded alias the same tensor as its stored key where the model does not already."""
    state = model.state_dict(keep_vars=True)
    for alias, key in ties.items():
        if alias not in state or key not in state:
            continue  # reported as unexpected by _load_exact
        if state[alias] is state[key]:
            continue
        owner_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = state[key]
        else:
            owner._buffers[attr] = state[key]
        logger.info("re-tied %s to %s", alias, key)


def _load_exact(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    mismatched = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if mismatched or missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the {type(model).__name__} rebuilt from its config: "
            f"{len(missing)} missing {missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}, "
            f"shape mismatches (saved, model) {dict(list(mismatched.items())[:10])}. Was the model changed "
            f"after construction (e.g. resize_token_embeddings), or an init argument overridden?")
    model.load_state_dict(state, strict=True)


def _verify_ties(model: nn.Module, ties: Dict[str, str]) -> None:
    state = model.state_dict()
    broken: List[str] = [alias for alias, key in ties.items()
                         if state[alias].data_ptr() != state[key].data_ptr()]
    if broken:
        raise CheckpointError(f"tied weights do not share storage after loading: {broken[:10]}")
