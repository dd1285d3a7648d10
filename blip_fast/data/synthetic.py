"""A built-in image-caption dataset: rendered shapes described by their captions.

Each scene holds one or more objects, each with a colour, a shape, a size and a position on a 3x3
grid, drawn on a plain grey background with a little noise; the caption names them all ("a large red circle at the top
left and a small blue cross in the center"). A scene's content is a function of
``(seed, index)``; its rendering (exact position, size and shade, background, noise, caption
template) also depends on the epoch, so every epoch sees fresh pixels of the same scenes. No file is
read or written: the job runs anywhere, and learning shows quickly (colour and position are easy,
shape and size harder).

The held-out split (``split='val'``) has distinct canonical captions, so that retrieval there has
exactly one right answer per image and per caption.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .base import ImageTextSource

COLORS = {
    "red": (215, 38, 38), "green": (40, 165, 60), "blue": (40, 85, 215), "yellow": (235, 205, 40),
    "purple": (135, 55, 185), "orange": (240, 135, 25), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = {"small": (0.09, 0.12), "large": (0.16, 0.20)}  # half-extent as a fraction of the image side
POSITIONS = (("top left", "at the top left"), ("top", "at the top"), ("top right", "at the top right"),
             ("left", "on the left"), ("center", "in the center"), ("right", "on the right"),
             ("bottom left", "at the bottom left"), ("bottom", "at the bottom"),
             ("bottom right", "at the bottom right"))
TEMPLATES = ("{objects}", "a picture of {objects}", "there is {objects}")
_VAL_STREAM = 1_000_003  # seeds the held-out scenes apart from the training ones


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    cell: int  # 0..8, row-major on the 3x3 grid

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {POSITIONS[self.cell][1]}"


def describe(objects: Sequence[ShapeObject], template: int = 0) -> str:
    return TEMPLATES[template].format(objects=" and ".join(o.phrase() for o in objects))


def draw_scene(rng: np.random.Generator, max_objects: int) -> Tuple[ShapeObject, ...]:
    """1..max_objects objects in distinct grid cells."""
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    colors, shapes, sizes = list(COLORS), SHAPES, list(SIZES)
    return tuple(ShapeObject(colors[int(rng.integers(len(colors)))], shapes[int(rng.integers(len(shapes)))],
                             sizes[int(rng.integers(len(sizes)))], int(c)) for c in cells)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":
        return (dy <= 0.8 * r) & (1.8 * np.abs(dx) <= dy + r)
    if shape == "cross":
        return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {shape!r}")


def render(objects: Sequence[ShapeObject], size: int, rng: np.random.Generator) -> np.ndarray:
    """The scene as an ``(size, size, 3)`` uint8 array, with fresh jitter from ``rng``."""
    img = np.full((size, size, 3), 128 + int(rng.integers(-8, 9)), dtype=np.int16)
    img += rng.integers(-6, 7, size=(size, size, 3), dtype=np.int16)
    cell = size / 3.0
    for obj in objects:
        lo, hi = SIZES[obj.size]
        r = rng.uniform(lo, hi) * size
        slack = max(cell / 2 - r, 0.0) * 0.7
        row, col = divmod(obj.cell, 3)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
        dy, dx = np.ogrid[y0:y1, x0:x1]
        mask = _shape_mask(obj.shape, dx + 0.5 - cx, dy + 0.5 - cy, r)
        color = np.asarray(COLORS[obj.color]) + rng.integers(-15, 16, size=3)
        region = img[y0:y1, x0:x1]
        region[mask] = color
    return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticShapes(ImageTextSource):
    """Rendered-shape scenes with captions; no files.

    ``split``: ``'train'`` (``size`` scenes, re-rendered every epoch, caption templates varied) or
    ``'val'`` (``size`` scenes with distinct captions, fixed rendering, canonical template).
    ``image_size``: the side in pixels; ``max_objects``: objects per scene (1..9).
    """

    renders_tensors = True

    def __init__(self, size: int, image_size: int, seed: int = 0, split: str = "train", max_objects: int = 2):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 1 <= max_objects <= 9:
            raise ValueError(f"max_objects must be in 1..9, got {max_objects}")
        if image_size < 24:
            raise ValueError(f"image_size {image_size} is too small to draw shapes on (use >= 24)")
        self.size, self.image_size, self.seed = int(size), int(image_size), int(seed)
        self.split, self.max_objects = split, int(max_objects)
        self.epoch = 0
        self._val: Optional[List[Tuple[ShapeObject, ...]]] = self._distinct_scenes() if split == "val" else None

    def _distinct_scenes(self) -> List[Tuple[ShapeObject, ...]]:
        capacity = len(COLORS) * len(SHAPES) * len(SIZES) * 9
        if self.max_objects == 1 and self.size > capacity:
            raise ValueError(f"only {capacity} distinct one-object scenes exist; ask for at most that many")
        rng = np.random.default_rng([self.seed, _VAL_STREAM])
        scenes, seen = [], set()
        while len(scenes) < self.size:
            scene = draw_scene(rng, self.max_objects)
            caption = describe(scene)
            if caption not in seen:
                seen.add(caption)
                scenes.append(scene)
        return scenes

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def scene(self, index: int) -> Tuple[ShapeObject, ...]:
        if self._val is not None:
            return self._val[index]
        return draw_scene(np.random.default_rng([self.seed, index]), self.max_objects)

    def load(self, index: int, rng: np.random.Generator) -> Tuple[torch.Tensor, str]:
        objects = self.scene(index)
        if self._val is not None:
            rng = np.random.default_rng([self.seed, _VAL_STREAM, index, 1])
            template = 0
        else:
            template = int(rng.integers(len(TEMPLATES)))
        image = render(objects, self.image_size, rng)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), describe(objects, template)

    def captions(self) -> List[str]:
        return [describe(self.scene(i)) for i in range(len(self))]

    def describe(self) -> str:
        return (f"synthetic shapes ({self.split}, {self.size} scenes, {self.image_size}px, "
                f"up to {self.max_objects} objects)")
