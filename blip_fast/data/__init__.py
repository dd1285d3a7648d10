"""Data for the pretraining job: BLIP's JSON annotations, tar shards, a synthetic dataset, BLIP's
transforms and caption cleaning, worker-side tokenisation and a resumable distributed sampler."""
from .base import ImageTextSource, Sample, SampleError, TransformedDataset, open_image, sample_rng
from .captions import pre_caption
from .collate import ImageTextBatch, ImageTextCollator
from .json_dataset import JsonImageText, read_annotations
from .randaugment import BLIP_AUGS, RandomAugment
from .sampler import EpochBatchSampler
from .synthetic import SyntheticShapes
from .tar_shards import TarShards, expand_braces
from .transforms import MEAN, STD, EvalTransform, PretrainTransform, normalize_images, to_uint8_tensor

__all__ = [
    "ImageTextSource", "Sample", "SampleError", "TransformedDataset", "open_image", "sample_rng", "pre_caption",
    "ImageTextBatch", "ImageTextCollator", "JsonImageText", "read_annotations", "BLIP_AUGS", "RandomAugment",
    "EpochBatchSampler", "SyntheticShapes", "TarShards", "expand_braces", "MEAN", "STD", "EvalTransform",
    "PretrainTransform", "normalize_images", "to_uint8_tensor",
]
