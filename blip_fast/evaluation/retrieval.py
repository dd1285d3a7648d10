"""Zero-shot image-text retrieval as BLIP's ``train_retrieval.py`` evaluates it.

Image and text features come from the unimodal encoders (``vision_proj`` / ``text_proj`` of the
``[CLS]`` outputs, normalised); the ITC similarity ranks every text for every image and every
image for every text; then, for each query, the ``k_test`` best candidates are re-scored by the
image-grounded encoder: ``score = itm_head(...)[:, 1] + itc_similarity`` (other candidates keep
-100). Recall@K counts a query as found when a ground-truth item ranks within the first K
(image->text: the best-ranked of the image's captions).

Works with any model that has BLIP's retrieval modules (``visual_encoder``, ``vision_proj``,
``text_encoder``, ``text_proj``, ``itm_head``): :class:`~blip_fast.BLIP_Pretrain`,
:class:`~blip_fast.BLIP_ITM`. Under torch.distributed the re-ranking rows are split across ranks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.base import SampleError, open_image
from ..data.captions import pre_caption
from ..data.json_dataset import read_annotations
from ..data.transforms import EvalTransform, normalize_images
from ..tokenizer import tokenize

logger = logging.getLogger("blip_fast.evaluation")

Tensor = torch.Tensor
EVAL_TEXT_LENGTH = 35  # BLIP's retrieval evaluation pads/truncates captions to 35 tokens


# -- metrics ---------------------------------------------------------------------------------------
def _ranks(scores: np.ndarray) -> np.ndarray:
    """``ranks[q, c]``: position of candidate c in query q's ranking (0 = best; ties as the original,
    ``np.argsort(score)[::-1]``)."""
    order = np.argsort(scores, axis=1)[:, ::-1]
    ranks = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    ranks[rows, order] = np.arange(scores.shape[1])[None, :]
    return ranks


def recall_at_k(scores_i2t: Any, scores_t2i: Any, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@K in percent, as the original ``itm_eval``: ``txt_r{k}`` (image->text), ``img_r{k}``
    (text->image), their means ``txt_r_mean`` / ``img_r_mean`` and ``r_mean``.

    ``scores_i2t``: ``(num_images, num_texts)``; ``scores_t2i``: ``(num_texts, num_images)``;
    ``img2txt[i]``: the texts of image i; ``txt2img[t]``: the image of text t.
    """
    s_i2t = np.asarray(scores_i2t.float().cpu() if isinstance(scores_i2t, Tensor) else scores_i2t, dtype=np.float64)
    s_t2i = np.asarray(scores_t2i.float().cpu() if isinstance(scores_t2i, Tensor) else scores_t2i, dtype=np.float64)
    n_img, n_txt = s_i2t.shape
    if s_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i {s_t2i.shape} should be {(n_txt, n_img)} (texts x images)")
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"{len(img2txt)} img2txt entries and {len(txt2img)} txt2img entries for "
                         f"{n_img} images and {n_txt} texts")
    ranks_i2t = _ranks(s_i2t)
    best = np.array([ranks_i2t[i, list(gt)].min() if len(gt) else np.inf for i, gt in enumerate(img2txt)])
    ranks_t2i = _ranks(s_t2i)[np.arange(n_txt), np.asarray(txt2img)]
    out: Dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float(np.mean(best < k))
    for k in ks:
        out[f"img_r{k}"] = 100.0 * float(np.mean(ranks_t2i < k))
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# -- evaluation data -------------------------------------------------------------------------------
@dataclass
class RetrievalSet:
    """Images (``load_image(i) -> uint8 (3, S, S)``, may raise SampleError) and captions with the
    ground truth both ways."""

    num_images: int
    load_image: Callable[[int], Tensor]
    texts: List[str]
    txt2img: List[int]
    img2txt: List[List[int]] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.img2txt:
            self.img2txt = [[] for _ in range(self.num_images)]
            for t, i in enumerate(self.txt2img):
                self.img2txt[i].append(t)


class _ImageFiles:
    """Picklable ``load_image`` over image paths (data-loader workers may spawn)."""

    def __init__(self, paths: List[str], transform: EvalTransform):
        self.paths, self.transform = paths, transform

    def __call__(self, i: int) -> Tensor:
        return self.transform(open_image(self.paths[i]))


class _SyntheticImages:
    def __init__(self, source: Any, seed: int):
        self.source, self.seed = source, seed

    def __call__(self, i: int) -> Tensor:
        from ..data.base import sample_rng
        return self.source.load(i, sample_rng(self.seed, 0, i))[0]


def retrieval_set_from_json(ann_file: str, image_root: str, image_size: int, max_words: int = 30) -> RetrievalSet:
    """A retrieval set from BLIP-format annotations (``{"image", "caption": str or list}``; entries
    naming the same image are merged), captions cleaned with ``pre_caption(c, max_words)``."""
    ann = read_annotations(ann_file)
    transform = EvalTransform(image_size)
    image_ids: Dict[str, int] = {}
    paths: List[str] = []
    texts: List[str] = []
    txt2img: List[int] = []
    for entry in ann:
        path = entry["image"]
        if image_root and not os.path.isabs(path):
            path = os.path.join(image_root, path)
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        captions = [pre_caption(c, max_words) for c in captions if isinstance(c, str)]
        captions = [c for c in captions if c]
        if not captions:
            continue
        if path not in image_ids:
            image_ids[path] = len(paths)
            paths.append(path)
        for c in captions:
            texts.append(c)
            txt2img.append(image_ids[path])
    return RetrievalSet(len(paths), _ImageFiles(paths, transform), texts, txt2img, name=os.path.basename(ann_file))


def retrieval_set_synthetic(size: int, image_size: int, seed: int, max_objects: int = 2) -> RetrievalSet:
    """The synthetic held-out split: ``size`` scenes, one distinct caption each."""
    from ..data.synthetic import SyntheticShapes
    source = SyntheticShapes(size, image_size, seed=seed, split="val", max_objects=max_objects)
    return RetrievalSet(size, _SyntheticImages(source, seed), source.captions(), list(range(size)),
                        name=f"synthetic-val-{size}")


class _Images(Dataset):
    def __init__(self, rset: RetrievalSet):
        self.rset = rset

    def __len__(self) -> int:
        return self.rset.num_images

    def __getitem__(self, i: int) -> Tuple[int, Optional[Tensor], str]:
        try:
            return i, self.rset.load_image(i), ""
        except SampleError as exc:
            return i, None, str(exc)


def _collate(items):
    return items


# -- scoring -----------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _row_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    step = n // world + 1
    return min(n, rank * step), min(n, rank * step + step)


@torch.no_grad()
def retrieval_scores(model: Any, rset: RetrievalSet, device: torch.device, k_test: int = 256, amp: str = "none",
                     batch_size: int = 64, num_workers: int = 0, rerank: bool = True,
                     itm_batch: int = 256) -> Dict[str, Any]:
    """Features, the ITC similarity matrix and (``rerank``) the ITM re-ranked score matrices.

    Returns ``{"sims": (I, T), "i2t": (I, T) or None, "t2i": (T, I) or None, "img2txt", "txt2img",
    "skipped_images": [(index, reason)]}`` with images that could not be read left out (and their
    captions with them).
    """
    was_training = model.training
    model.eval()
    ctx = model.backend_context() if hasattr(model, "backend_context") else contextlib.nullcontext()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    try:
        with ctx, _autocast(device, amp):
            # images
            loader = DataLoader(_Images(rset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                generator=torch.Generator().manual_seed(0))  # leaves the global generator alone
            image_embeds, image_feats, kept, skipped = [], [], [], []
            for items in loader:
                good = [(i, img) for i, img, _ in items if img is not None]
                skipped += [(i, why) for i, img, why in items if img is None]
                if not good:
                    continue
                images = normalize_images(torch.stack([img for _, img in good]).to(device, non_blocking=True))
                embeds = model.visual_encoder(images)
                image_embeds.append(embeds)
                image_feats.append(F.normalize(model.vision_proj(embeds[:, 0, :]).float(), dim=-1))
                kept += [i for i, _ in good]
            if not kept:
                raise RuntimeError(f"no image of {rset.name or 'the evaluation set'} could be read "
                                   f"(first problem: {skipped[0][1] if skipped else '?'})")
            image_embeds = torch.cat(image_embeds)
            image_feat = torch.cat(image_feats)
            new_id = {old: new for new, old in enumerate(kept)}
            text_keep = [t for t, i in enumerate(rset.txt2img) if i in new_id]
            texts = [rset.texts[t] for t in text_keep]
            txt2img = [new_id[rset.txt2img[t]] for t in text_keep]
            img2txt: List[List[int]] = [[] for _ in kept]
            for t, i in enumerate(txt2img):
                img2txt[i].append(t)
            # texts
            tokens = tokenize(model.tokenizer, texts, padding="max_length", max_length=EVAL_TEXT_LENGTH)
            text_ids = tokens.input_ids.to(device)
            text_atts = tokens.attention_mask.to(device)
            text_feats = []
            for s in range(0, len(texts), 256):
                out = model.text_encoder(text_ids[s:s + 256], attention_mask=text_atts[s:s + 256], mode="text",
                                         return_dict=True)
                text_feats.append(F.normalize(model.text_proj(out.last_hidden_state[:, 0, :]).float(), dim=-1))
            text_feat = torch.cat(text_feats)
            text_ids = text_ids.clone()
            text_ids[:, 0] = model.enc_token_id
            sims = image_feat @ text_feat.t()
            result: Dict[str, Any] = {"sims": sims.cpu(), "i2t": None, "t2i": None, "img2txt": img2txt,
                                      "txt2img": txt2img, "skipped_images": skipped}
            if not rerank:
                return result

            def itm_scores(img_idx: Tensor, txt_idx: Tensor) -> Tensor:
                out = []
                for s in range(0, img_idx.numel(), itm_batch):
                    ii, tt = img_idx[s:s + itm_batch], txt_idx[s:s + itm_batch]
                    o = model.text_encoder(text_ids[tt], attention_mask=text_atts[tt],
                                           encoder_hidden_states=image_embeds[ii], return_dict=True)
                    out.append(model.itm_head(o.last_hidden_state[:, 0, :])[:, 1].float())
                return torch.cat(out)

            results = []
            for scores, n_q, n_c, q_is_image in ((sims, len(kept), len(texts), True),
                                                 (sims.t(), len(texts), len(kept), False)):
                k = min(k_test, n_c)
                lo, hi = _row_range(n_q, rank, world)
                matrix = torch.zeros(n_q, n_c, device=device)
                matrix[lo:hi] = -100.0
                if hi > lo:
                    topk_sim, topk_idx = scores[lo:hi].topk(k, dim=1)
                    queries = torch.arange(lo, hi, device=device).repeat_interleave(k)
                    cands = topk_idx.reshape(-1)
                    s = itm_scores(queries, cands) if q_is_image else itm_scores(cands, queries)
                    matrix[lo:hi].scatter_(1, topk_idx, (s.view(hi - lo, k) + topk_sim.float()))
                if world > 1:
                    dist.all_reduce(matrix)
                results.append(matrix.cpu())
            result["i2t"], result["t2i"] = results
            return result
    finally:
        model.train(was_training)


def evaluate_retrieval(model: Any, rset: RetrievalSet, device: torch.device, k_test: int = 256, amp: str = "none",
                       batch_size: int = 64, num_workers: int = 0, rerank: bool = True) -> Dict[str, Any]:
    """Recall@1/5/10 both ways: ``itc_*`` from the ITC ranking alone, and (``rerank``) the plain
    keys after ITM re-ranking of the top ``k_test``, as BLIP reports them. Also ``chance_r1``,
    ``num_images``, ``num_texts``, ``skipped_images``, ``seconds``."""
    start = time.perf_counter()
    scores = retrieval_scores(model, rset, device, k_test, amp, batch_size, num_workers, rerank)
    img2txt, txt2img = scores["img2txt"], scores["txt2img"]
    metrics: Dict[str, Any] = {f"itc_{k}": v for k, v in
                               recall_at_k(scores["sims"], scores["sims"].t(), img2txt, txt2img).items()}
    if rerank:
        metrics.update(recall_at_k(scores["i2t"], scores["t2i"], img2txt, txt2img))
        metrics["k_test"] = k_test
    n_img, n_txt = len(img2txt), len(txt2img)
    chance_txt = 100.0 * float(np.mean([len(t) for t in img2txt])) / max(n_txt, 1)
    chance_img = 100.0 / max(n_img, 1)
    metrics.update(num_images=n_img, num_texts=n_txt, skipped_images=len(scores["skipped_images"]),
                   chance_txt_r1=chance_txt, chance_img_r1=chance_img, chance_r1=max(chance_txt, chance_img),
                   seconds=round(time.perf_counter() - start, 2))
    if scores["skipped_images"]:
        logger.warning("evaluation: %d image(s) could not be read and were left out with their captions "
                       "(first: %s)", len(scores["skipped_images"]), scores["skipped_images"][0][1])
    return metrics


def format_metrics(m: Dict[str, Any], itc_only: bool = False) -> str:
    """One line: R@1/5/10 both ways (ITM re-ranked when present, unless ``itc_only``) and chance."""
    prefix = "itc_" if itc_only or "txt_r1" not in m else ""
    head = "ITC+ITM" if prefix == "" else "ITC"
    return (f"{head} image->text R@1/5/10 {m[prefix + 'txt_r1']:.1f}/{m[prefix + 'txt_r5']:.1f}/"
            f"{m[prefix + 'txt_r10']:.1f}  text->image {m[prefix + 'img_r1']:.1f}/{m[prefix + 'img_r5']:.1f}/"
            f"{m[prefix + 'img_r10']:.1f}  (chance R@1 {m['chance_r1']:.2f}; {m['num_images']} images, "
            f"{m['num_texts']} texts)")
