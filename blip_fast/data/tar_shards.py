"""Image-caption pairs from webdataset-style tar shards, read with the standard library.

A shard is an uncompressed tar whose members are grouped into samples by key: ``dir/000123.jpg``,
``dir/000123.txt`` and ``dir/000123.json`` form the sample ``dir/000123`` (the key is the path up
to the first dot of the file name, the extension is the rest, lower-cased). A sample needs an image
(``jpg``, ``jpeg``, ``png``, ``webp``, ``bmp``) and a caption: ``txt`` (UTF-8), or ``json`` with a
``caption`` (or ``text``) field holding a string or a list of strings.

The shards are indexed once (member offsets from the tar headers, no image is read), so samples are
read by random access: shuffling, per-rank sharding and resuming mid-epoch work exactly as for
JSON annotations. Samples without an image or a caption are left out at indexing and counted.
Shard names accept globs and webdataset's brace ranges (``shards-{000000..000099}.tar``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import ImageTextSource, SampleError, choose_caption, open_image
from .json_dataset import expand_paths

logger = logging.getLogger("blip_fast.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
TEXT_EXTENSIONS = ("txt", "json")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> List[str]:
    """``a-{00..02}.tar`` -> ``['a-00.tar', 'a-01.tar', 'a-02.tar']`` (zero padding kept; several
    ranges expand as a product)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
    out: List[str] = []
    for value in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[:m.start()] + str(value).zfill(width) + pattern[m.end():]))
    return out


def split_key(name: str) -> Tuple[str, str]:
    """Member name -> (sample key, extension) by webdataset's rule (first dot of the base name)."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def index_shard(path: str) -> Tuple[List[Dict[str, Tuple[int, int]]], Counter]:
    """Samples of one shard as ``{extension: (data offset, size)}`` dicts, and the counts of
    incomplete samples left out."""
    try:
        tar = tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        raise ValueError(f"{path} is not an uncompressed tar file ({exc}); compressed shards cannot be "
                         f"read by random access: unpack them (e.g. gunzip) first") from None
    groups: Dict[str, Dict[str, Tuple[int, int]]] = {}
    order: List[str] = []
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = (member.offset_data, member.size)
        except tarfile.TarError as exc:
            logger.warning("%s: tar stream broken after %d samples (%s); using the samples before it",
                           path, len(order), exc)
    samples: List[Dict[str, Tuple[int, int]]] = []
    left_out: Counter = Counter()
    for key in order:
        members = groups[key]
        has_image = any(ext in members for ext in IMAGE_EXTENSIONS)
        has_text = any(ext in members for ext in TEXT_EXTENSIONS)
        if not has_image:
            left_out["no image member"] += 1
        elif not has_text:
            left_out["no caption member"] += 1
        else:
            samples.append(members)
    return samples, left_out


class TarShards(ImageTextSource):
    """Samples from tar shards (``shards``: paths, globs or brace ranges)."""

    def __init__(self, shards: Union[str, Sequence[str]]):
        patterns = [shards] if isinstance(shards, str) else list(shards)
        self.paths = expand_paths([p for pattern in patterns for p in expand_braces(pattern)])
        self.samples: List[Tuple[int, Dict[str, Tuple[int, int]]]] = []
        self.left_out: Counter = Counter()
        for shard_id, path in enumerate(self.paths):
            samples, left_out = index_shard(path)
            self.samples.extend((shard_id, s) for s in samples)
            self.left_out.update(left_out)
        if self.left_out:
            logger.warning("tar shards: left out %s", dict(self.left_out))
        logger.info("indexed %d samples in %d tar shard(s)", len(self.samples), len(self.paths))
        self._handles: Dict[int, Any] = {}
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _read(self, shard_id: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # file handles are per process (data-loader workers fork)
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(shard_id)
        if f is None:
            f = self._handles[shard_id] = open(self.paths[shard_id], "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise SampleError("corrupt image", f"{self.paths[shard_id]}: short read at offset {offset}")
        return data

    def load(self, index: int, rng: np.random.Generator) -> Tuple[Any, str]:
        shard_id, members = self.samples[index]
        where = f"{self.paths[shard_id]} sample {index}"
        if "txt" in members:
            caption: Any = self._read(shard_id, *members["txt"]).decode("utf-8", errors="replace")
        else:
            try:
                meta = json.loads(self._read(shard_id, *members["json"]))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SampleError("bad caption", f"{where}: {exc}") from None
            caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            if caption is None:
                raise SampleError("empty caption", f"{where}: json has no caption/text field")
        caption = choose_caption(caption, rng, where)
        ext = next(e for e in IMAGE_EXTENSIONS if e in members)
        return open_image(self._read(shard_id, *members[ext]), where), caption

    def describe(self) -> str:
        return f"tar shards ({len(self.paths)} files, {len(self)} samples)"
