"""Image-caption pairs from JSON annotation files in BLIP's format.

Each file holds a list of ``{"image": path, "caption": str or [str, ...]}`` (other keys are ignored).
Relative image paths are joined to ``image_root``. As the original ``pretrain_dataset``, an
optional ``laion_path`` folder of further JSON files adds one of them per epoch
(``files[epoch % len(files)]``, in sorted order).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import ImageTextSource, choose_caption, open_image

logger = logging.getLogger("blip_fast.data")


def read_annotations(path: str) -> List[Dict[str, Any]]:
    """A JSON annotation file (a list of objects with ``image`` and ``caption``), checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            ann = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(ann, list):
        raise ValueError(f"{path}: expected a JSON list of {{\"image\": ..., \"caption\": ...}} objects, "
                         f"got a {type(ann).__name__}")
    for i, entry in enumerate(ann[:1000]):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise ValueError(f"{path}: entry {i} is {str(entry)[:120]!r}; every entry needs "
                             f"\"image\" (a path) and \"caption\" (a string or a list of strings)")
    return ann


def expand_paths(patterns: Union[str, Sequence[str]]) -> List[str]:
    """File paths from a path, a glob or a list of them (each glob sorted; order kept)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: List[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        paths.extend(matches)
    return paths


class JsonImageText(ImageTextSource):
    """Samples from BLIP-format JSON annotation files (``ann_files``: paths or globs)."""

    def __init__(self, ann_files: Union[str, Sequence[str]], image_root: str = "", laion_path: str = ""):
        self.files = expand_paths(ann_files) if ann_files else []
        self.image_root = image_root or ""
        self.base: List[Dict[str, Any]] = []
        for path in self.files:
            ann = read_annotations(path)
            logger.info("loaded %d annotations from %s", len(ann), path)
            self.base += ann
        self.laion_files: List[str] = []
        self.laion_loaded: Optional[str] = None
        if laion_path:
            self.laion_files = sorted(glob.glob(os.path.join(laion_path, "*.json")))
            if not self.laion_files:
                raise FileNotFoundError(f"laion_path {laion_path!r} holds no *.json files")
        self.annotation = self.base
        self.set_epoch(0)
        if not self.annotation:
            raise ValueError(f"no annotations in {self.files or laion_path}")

    def set_epoch(self, epoch: int) -> None:
        if not self.laion_files:
            return
        path = self.laion_files[epoch % len(self.laion_files)]
        if path != self.laion_loaded:
            self.annotation = self.base + read_annotations(path)
            self.laion_loaded = path
            logger.info("epoch %d: %d annotations (+%s)", epoch, len(self.annotation), path)

    def __len__(self) -> int:
        return len(self.annotation)

    def image_path(self, entry: Dict[str, Any]) -> str:
        path = entry["image"]
        return path if os.path.isabs(path) or not self.image_root else os.path.join(self.image_root, path)

    def load(self, index: int, rng: np.random.Generator) -> Tuple[Any, str]:
        entry = self.annotation[index]
        caption = choose_caption(entry["caption"], rng, f"annotation {index} ({entry['image']})")
        return open_image(self.image_path(entry)), caption

    def describe(self) -> str:
        return f"JSON annotations {self.files} ({len(self)} samples, image_root={self.image_root!r})"
