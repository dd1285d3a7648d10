"""RandAugment as BLIP's ``transform/randaugment.py`` defines it, on Pillow and NumPy (no OpenCV).

``RandomAugment(N, M, isPIL, augs, prob)``: per image, draw ``N`` operation names with replacement
from ``augs``; apply each with probability ``prob`` at magnitude ``M`` (0-10). The operations, their
magnitudes and the fill value (128 grey) are the original's; BLIP's pretraining uses
``RandomAugment(2, 5, isPIL=True, augs=BLIP_AUGS)``, where the enhance factor is
``5 / 10 * 1.8 + 0.1 = 1.0`` (so Brightness and Sharpness leave the image unchanged, as in the
original), shears are 0.15, translations 5 pixels and rotations 15 degrees, each with a random sign.

Geometry follows OpenCV's pixel-centre convention (rotation about ``(W/2, H/2)``, shear about the
first pixel centre) with bilinear sampling. Colour operations reproduce the original's formulas,
including its grey weights ``(0.114, 0.587, 0.299)`` applied to RGB channels; results of the
enhance operations are clipped to [0, 255] before the cast (the original lets Sharpness wrap).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

MAX_LEVEL = 10
TRANSLATE_CONST = 10
FILL = (128, 128, 128)
_GREY_WEIGHTS = np.array([0.114, 0.587, 0.299], dtype=np.float32)  # as the original (BGR weights)

#: The operations of BLIP's pretraining and fine-tuning transforms.
BLIP_AUGS = ["Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
             "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]

Array = np.ndarray
RandomSource = Union[np.random.Generator, None]


# -- operations on HWC uint8 RGB arrays --------------------------------------------------------------
def _pil_op(img: Array, fn: Callable[[Image.Image], Image.Image]) -> Array:
    return np.asarray(fn(Image.fromarray(img)))


def identity(img: Array) -> Array:
    return img


def autocontrast(img: Array) -> Array:
    """Stretch each channel to [0, 255] (cutoff 0)."""
    return _pil_op(img, ImageOps.autocontrast)


def equalize(img: Array) -> Array:
    """Per-channel histogram equalisation (PIL's definition, which the original reproduces)."""
    return _pil_op(img, ImageOps.equalize)


def solarize(img: Array, threshold: int = 128) -> Array:
    return _pil_op(img, lambda im: ImageOps.solarize(im, threshold))


def posterize(img: Array, bits: int) -> Array:
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return np.bitwise_and(img, mask)


def _to_uint8(x: Array) -> Array:
    return np.clip(x, 0, 255).astype(np.uint8)


def color(img: Array, factor: float) -> Array:
    """Blend with the grey image ``0.114 R + 0.587 G + 0.299 B`` (the original's matrix)."""
    grey = img.astype(np.float32) @ _GREY_WEIGHTS
    return _to_uint8(factor * img.astype(np.float32) + (1.0 - factor) * grey[..., None])


def contrast(img: Array, factor: float) -> Array:
    mean = float(np.sum(np.mean(img, axis=(0, 1)) * _GREY_WEIGHTS))
    table = _to_uint8((np.arange(256, dtype=np.float64) - mean) * factor + mean)
    return table[img]


def brightness(img: Array, factor: float) -> Array:
    table = _to_uint8(np.arange(256, dtype=np.float32) * factor)
    return table[img]


def sharpness(img: Array, factor: float) -> Array:
    """Blend with a 3x3 smoothing (centre weight 5 of 13); the border pixels are kept unless
    ``factor == 0``."""
    if factor == 1.0:
        return img
    padded = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    acc = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    degenerate = np.clip(np.rint((acc + 4.0 * img) / 13.0), 0, 255)
    if factor == 0.0:
        return degenerate.astype(np.uint8)
    out = img.astype(np.float32)
    inner = degenerate[1:-1, 1:-1]
    out[1:-1, 1:-1] = inner + factor * (out[1:-1, 1:-1] - inner)
    return _to_uint8(out)


def _affine(img: Array, matrix: Tuple[float, ...], fill: Sequence[int]) -> Array:
    """Output pixel (x, y) samples the input at ``(a x + b y + c, d x + e y + f)`` (pixel centres at
    integers, as OpenCV), bilinear, ``fill`` outside."""
    a, b, c, d, e, f = matrix
    # PIL samples output pixel centres at x + 0.5 and reads input coordinates with centres at +0.5.
    pil = (a, b, c + 0.5 * (1.0 - a - b), d, e, f + 0.5 * (1.0 - d - e))
    h, w = img.shape[:2]
    return _pil_op(img, lambda im: im.transform((w, h), Image.AFFINE, pil, resample=Image.BILINEAR,
                                                fillcolor=tuple(fill)))


def shear_x(img: Array, factor: float, fill: Sequence[int] = FILL) -> Array:
    return _affine(img, (1.0, -factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(img: Array, factor: float, fill: Sequence[int] = FILL) -> Array:
    return _affine(img, (1.0, 0.0, 0.0, -factor, 1.0, 0.0), fill)


def translate_x(img: Array, offset: float, fill: Sequence[int] = FILL) -> Array:
    """Content moves by ``-offset`` pixels along x (the original's sign convention)."""
    return _affine(img, (1.0, 0.0, offset, 0.0, 1.0, 0.0), fill)


def translate_y(img: Array, offset: float, fill: Sequence[int] = FILL) -> Array:
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, offset), fill)


def rotate(img: Array, degrees: float, fill: Sequence[int] = FILL) -> Array:
    """Counter-clockwise rotation by ``degrees`` about ``(W/2, H/2)``."""
    h, w = img.shape[:2]
    cx, cy = w / 2.0, h / 2.0
    t = np.deg2rad(degrees)
    cos, sin = float(np.cos(t)), float(np.sin(t))
    # inverse of the forward rotation (counter-clockwise on screen, y pointing down)
    matrix = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    return _affine(img, matrix, fill)


# -- magnitudes ------------------------------------------------------------------------------------
def _signed(value: float, rng, negate_if_above: bool) -> float:
    r = rng.random()
    return -value if (r > 0.5 if negate_if_above else r < 0.5) else value


def _args(name: str, level: float, rng) -> tuple:
    """The original ``arg_dict[name](level)``, drawing the sign from ``rng`` in the same order."""
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        return (_signed((level / MAX_LEVEL) * 0.3, rng, True), FILL)
    if name in ("TranslateX", "TranslateY"):
        return (_signed((level / MAX_LEVEL) * float(TRANSLATE_CONST), rng, True), FILL)
    if name == "Rotate":
        return (_signed((level / MAX_LEVEL) * 30, rng, False), FILL)
    if name == "Solarize":
        return (int((level / MAX_LEVEL) * 256),)
    if name == "Posterize":
        return (int((level / MAX_LEVEL) * 4),)
    raise KeyError(name)


OPS: Dict[str, Callable[..., Array]] = {
    "Identity": identity, "AutoContrast": autocontrast, "Equalize": equalize, "Rotate": rotate,
    "Solarize": solarize, "Color": color, "Contrast": contrast, "Brightness": brightness,
    "Sharpness": sharpness, "ShearX": shear_x, "TranslateX": translate_x, "TranslateY": translate_y,
    "Posterize": posterize, "ShearY": shear_y,
}


class RandomAugment:
    """``RandomAugment(N=2, M=10, isPIL=False, augs=[], prob=0.5)`` as in BLIP.

    ``__call__(img, rng=None)``: ``img`` is a PIL image (``isPIL=True``) or an HWC uint8 array;
    returns an HWC uint8 array. ``rng`` is a ``numpy.random.Generator`` (reproducible per sample);
    without one NumPy's global generator is used, as the original does.
    """

    def __init__(self, N: int = 2, M: float = 10, isPIL: bool = False, augs: Optional[List[str]] = None,
                 prob: float = 0.5):
        augs = list(augs) if augs else list(OPS)
        unknown = [a for a in augs if a not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment operation(s) {unknown}; choose from {sorted(OPS)}")
        if not 0 <= M <= MAX_LEVEL:
            raise ValueError(f"magnitude M must be in [0, {MAX_LEVEL}], got {M}")
        self.N, self.M, self.isPIL, self.augs, self.prob = int(N), M, isPIL, augs, prob

    def get_random_ops(self, rng: RandomSource = None) -> List[Tuple[str, float, float]]:
        rng = np.random if rng is None else rng
        picks = rng.choice(len(self.augs), self.N)
        return [(self.augs[int(i)], self.prob, self.M) for i in picks]

    def __call__(self, img, rng: RandomSource = None) -> Array:
        source = np.random if rng is None else rng
        if self.isPIL or isinstance(img, Image.Image):
            img = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
        for name, prob, level in self.get_random_ops(rng):
            if source.random() > prob:
                continue
            img = OPS[name](img, *_args(name, level, source))
        return img

    def __repr__(self) -> str:
        return f"RandomAugment(N={self.N}, M={self.M}, augs={self.augs}, prob={self.prob})"
