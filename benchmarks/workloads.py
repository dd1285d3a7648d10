"""The benchmarked workloads: one class per (model, mode), built once and reused across backends,
dtypes and batch sizes of its group.

A workload builds its model in :meth:`Workload.setup`, makes ``n_sets`` independent input sets per
batch size in :meth:`Workload.make_inputs` (the runner rotates among them so caches cannot
flatter small shapes), and runs one step in :meth:`Workload.step`. The runner selects the op
backend around each step; peers (``peers.py``) are workloads with ``uses_backends = False``.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import blip_fast
from blip_fast import ops
from blip_fast.models.med import BertModel, load_med_config

from . import data, flops
from .config import Sizes


class Context:
    """What every workload shares: device, sizes, tokenizer, seed and a per-group model cache."""

    def __init__(self, device: torch.device, sizes: Sizes, tokenizer: data.Tokenizer, seed: int = 0):
        self.device = device
        self.sizes = sizes
        self.tokenizer = tokenizer
        self.seed = seed
        self._cache: Dict[str, Any] = {}

    def shared(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def drop(self, key: str) -> None:
        self._cache.pop(key, None)

    def clear(self) -> None:
        self._cache.clear()


class Workload:
    group = ""
    variant = ""
    impl = "blip_fast"
    unit = "img/s"
    uses_backends = True
    inputs_depend_on_dtype = False
    #: For peers: what tells apart several rows of one peer (e.g. the SDPA kernel), else None.
    peer_backend: Optional[str] = None
    #: The model this workload runs (its ``Context.shared`` key). The runner finishes every case of
    #: one model and frees it before building the next, so peak memory never counts another model.
    model_key: Optional[str] = None

    #: Set by the runner per case: "eager", "compile" (``torch.compile(self.model)``, see
    #: :meth:`net`) or "graph" (the whole step replayed from a CUDA graph, where supported).
    execution = "eager"
    compile_mode: Optional[str] = None
    #: Whether :meth:`step` can run as one captured CUDA graph (``--cuda-graph``).
    supports_graph = False
    #: Whether a ``torch.compile`` variant of :meth:`step` means anything (``--compile``).
    supports_compile = True

    @property
    def compiled(self) -> bool:
        return self.execution in ("compile", "compile+graph")

    @property
    def graphed(self) -> bool:
        """The whole step replayed from a CUDA graph ("graph"; "compile+graph": the graph captures
        the torch.compile'd model's kernels)."""
        return self.execution in ("graph", "compile+graph")

    @property
    def execution_suffix(self) -> str:
        return "" if self.execution == "eager" else "+" + self.execution

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.dtype = "fp32"
        self._compiled_net: Dict[Optional[str], Tuple[Any, Any]] = {}
        self.detail = ""  # what a peer really ran (attention implementation, kernel)
        self.setup_error: Optional[BaseException] = None
        self._ready = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def ensure_setup(self) -> None:
        if self.setup_error is not None:
            raise self.setup_error
        if not self._ready:
            try:
                self.setup()
            except BaseException as exc:
                self.setup_error = exc
                raise
            self._ready = True

    def setup(self) -> None:
        """Build the model (once)."""

    def begin_case(self) -> None:
        """Called before the warm-up of every case (e.g. train/eval mode)."""

    def cleanup(self) -> None:
        """Drop what a failed step may have left (gradients)."""

    #: Attributes holding models, optimizers and other memory, dropped by :meth:`teardown`.
    resources = ("model", "optimizer")

    def net(self, method: Optional[str] = None) -> Any:
        """What :meth:`step` calls: ``self.model`` (or its bound ``method``), or the
        ``torch.compile`` wrapper of it when the case is a compiled one (built once per model; it
        shares the parameters)."""
        fn = self.model if method is None else getattr(self.model, method)
        if not self.compiled:
            return fn
        cached = self._compiled_net.get(method)
        if cached is None or cached[0] is not self.model:
            cached = self._compiled_net[method] = (self.model, torch.compile(fn, mode=self.compile_mode))
        return cached[1]

    def teardown(self) -> None:
        self._compiled_net = {}
        for name in self.resources:
            if hasattr(self, name):
                setattr(self, name, None)
        self._ready = False

    # -- per case ----------------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def input_key(self) -> Any:
        """Workloads with equal keys take the same inputs (shared within a batch size and dtype)."""
        return (self.group, self.variant)

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        raise NotImplementedError

    def step(self, inputs: Any) -> None:
        raise NotImplementedError

    def items(self, batch: int) -> float:
        return float(batch)

    def flops(self, batch: int) -> Optional[float]:
        return None

    def shape(self, batch: int) -> Dict[str, Any]:
        return {}

    def details(self, batch: int) -> Dict[str, Any]:
        """What the timed steps did, recorded with the row after timing (e.g. tokens generated)."""
        return {}

    @property
    def label(self) -> str:
        return self.impl if not self.detail else f"{self.impl} ({self.detail})"


def _shapes(x: Any) -> tuple:
    from blip_fast.cuda_graph import _flatten
    return tuple((p, tuple(t.shape)) for p, t in _flatten(x) if isinstance(t, torch.Tensor))


def _dispatch_order() -> tuple:
    """The auto order in effect (the runner narrows it for single-backend cases)."""
    from blip_fast.ops import _dispatch
    return tuple(_dispatch.AUTO_ORDER)


def _build(fn: Callable[[], torch.nn.Module], device: torch.device) -> torch.nn.Module:
    """Build a model directly on ``device`` (fast initialisation on the GPU)."""
    with torch.device(device):
        return fn()


def _med_kwargs(sizes: Sizes) -> Dict[str, Any]:
    return {} if sizes.med is None else {"med_config": dict(sizes.med)}


def _vit_name(vit: Any) -> str:
    return vit if isinstance(vit, str) else "custom " + ",".join(f"{k}={v}" for k, v in vit.items())


# -- BLIP_Pretrain ---------------------------------------------------------------------------------
class PretrainStep(Workload):
    variant = "train"

    def __init__(self, ctx: Context, large: bool = False):
        super().__init__(ctx)
        self.large = large
        self.group = "pretrain_large" if large else "pretrain"
        self.model_key = self.group
        s = ctx.sizes
        self.vit = s.vit_large if large else s.vit_base
        self.vit_dims = s.vit_large_dims if large else s.vit_base_dims

    def setup(self) -> None:
        s = self.ctx.sizes
        ckpt = getattr(self.ctx, "checkpointing", False)
        depth = self.vit_dims.depth
        self.model = _build(lambda: blip_fast.blip_pretrain(image_size=s.pretrain_image, vit=self.vit,
                                                            queue_size=s.queue_size, vit_grad_ckpt=ckpt,
                                                            vit_ckpt_layer=depth if ckpt else 0,
                                                            **_med_kwargs(s)),
                            self.ctx.device)
        if ckpt:  # every ViT block and every BERT layer recomputed in backward
            self.model.text_encoder.gradient_checkpointing_enable()
            self.model.text_decoder.gradient_checkpointing_enable()
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        if batch < 2:
            raise ValueError("BLIP_Pretrain needs a batch of at least 2 (each sample's hard negative is "
                             "drawn from the other samples)")
        s = self.ctx.sizes
        return data.image_text_sets(self.ctx.tokenizer, n_sets, batch, s.pretrain_image, s.pretrain_len,
                                    self.ctx.device, self.ctx.seed + batch)

    supports_graph = True
    resources = ("model", "optimizer", "graph_optimizer", "graphs")

    def step(self, inputs: Any) -> None:
        image, text = inputs
        if self.graphed:
            self._graphed(image, text)
            return
        self.optimizer.zero_grad(set_to_none=True)
        self._train_step(image, text, 0.4, self.optimizer)

    def _train_step(self, image: Any, text: Any, alpha: Any, optimizer: torch.optim.Optimizer) -> Any:
        with self.autocast():
            losses = self.net()(image, text, alpha=alpha)
        sum(losses).backward()
        optimizer.step()
        return losses

    def _graphed(self, image: Any, text: Any) -> None:
        """The step replayed from a CUDA graph captured on first use for this shape and dtype, with
        a capturable AdamW over the same parameters (its own moments: a separate optimiser)."""
        from blip_fast.cuda_graph import CUDAGraphStep

        if getattr(self, "graphs", None) is None:
            self.graphs = {}
        key = (tuple(image.shape), self.dtype, blip_fast.ops.get_backend(), _dispatch_order(), self.execution)
        if key not in self.graphs:
            self.graphs.clear()  # one captured step (and its memory pool) at a time
            if getattr(self, "graph_optimizer", None) is None:
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.graph_optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, capturable=True)
            alpha = torch.full((), 0.4, device=image.device)
            self.graphs[key] = (CUDAGraphStep(
                lambda i, t, a: self._train_step(i, t, a, self.graph_optimizer), image, text, alpha,
                optimizer=self.graph_optimizer), alpha)
        graph, alpha = self.graphs[key]
        graph(image, text, alpha)

    def cleanup(self) -> None:
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def flops(self, batch: int) -> float:
        s = self.ctx.sizes
        return flops.pretrain_step_flops(self.vit_dims, s.text_dims, s.pretrain_image, s.pretrain_len, batch,
                                         s.queue_size)["total"]

    def shape(self, batch: int) -> Dict[str, Any]:
        s = self.ctx.sizes
        return {"images": [batch, 3, s.pretrain_image, s.pretrain_image], "text_len": s.pretrain_len,
                "vit": _vit_name(self.vit), "queue_size": s.queue_size, "optimizer": "AdamW"}


# -- BLIP_ITM --------------------------------------------------------------------------------------
def _itm_model(ctx: Context):
    s = ctx.sizes
    return ctx.shared("blip_itm", lambda: _build(
        lambda: blip_fast.blip_itm(image_size=s.itm_image, vit=s.vit_base, **_med_kwargs(s)).eval(), ctx.device))


class ItmInference(Workload):
    model_key = "blip_itm"

    def __init__(self, ctx: Context, head: str):
        super().__init__(ctx)
        self.group = self.variant = self.head = head

    def setup(self) -> None:
        self.model = _itm_model(self.ctx)

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        s = self.ctx.sizes
        return data.image_text_sets(self.ctx.tokenizer, n_sets, batch, s.itm_image, s.itm_len,
                                    self.ctx.device, self.ctx.seed + 7 * batch)

    def step(self, inputs: Any) -> None:
        image, text = inputs
        with torch.inference_mode(), self.autocast():
            self.net()(image, text, match_head=self.head)

    def flops(self, batch: int) -> float:
        s = self.ctx.sizes
        fn = flops.itm_flops if self.head == "itm" else flops.itc_flops
        return fn(s.vit_base_dims, s.text_dims, s.itm_image, s.itm_len, batch)

    def shape(self, batch: int) -> Dict[str, Any]:
        s = self.ctx.sizes
        return {"images": [batch, 3, s.itm_image, s.itm_image], "text_len": s.itm_len, "vit": _vit_name(s.vit_base)}


# -- BLIP_NLVR -------------------------------------------------------------------------------------
class NlvrStep(Workload):
    group = "nlvr"
    model_key = "nlvr"
    variant = "train"
    unit = "pairs/s"

    def setup(self) -> None:
        s = self.ctx.sizes
        self.model = _build(lambda: blip_fast.blip_nlvr(image_size=s.nlvr_image, vit=s.vit_base, **_med_kwargs(s)),
                            self.ctx.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5,
                                           weight_decay=0.05)

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        s = self.ctx.sizes
        sets = data.image_text_sets(self.ctx.tokenizer, n_sets, batch, s.nlvr_image, s.nlvr_len, self.ctx.device,
                                    self.ctx.seed + 13 * batch, n_images=2 * batch)
        gen = data.generator(self.ctx.device, self.ctx.seed)
        return [(img, txt, torch.randint(0, 2, (batch,), generator=gen, device=self.ctx.device)) for img, txt in sets]

    def step(self, inputs: Any) -> None:
        images, text, targets = inputs
        with self.autocast():
            loss = self.net()(images, text, targets, train=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def cleanup(self) -> None:
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def flops(self, batch: int) -> float:
        s = self.ctx.sizes
        return flops.nlvr_step_flops(s.vit_base_dims, s.text_dims, s.nlvr_image, s.nlvr_len, batch)

    def shape(self, batch: int) -> Dict[str, Any]:
        s = self.ctx.sizes
        return {"images": [2 * batch, 3, s.nlvr_image, s.nlvr_image], "text_len": s.nlvr_len,
                "vit": _vit_name(s.vit_base), "optimizer": "AdamW"}


# -- one tower alone: forward, or forward + backward of the mean output -----------------------------
class EncoderWorkload(Workload):
    """A single encoder timed on its own; subclasses build ``self.model`` and define ``forward``."""

    resources = ("model", "optimizer", "graphs")

    def __init__(self, ctx: Context, backward: bool):
        super().__init__(ctx)
        self.backward = backward
        self.variant = "fwdbwd" if backward else "fwd"

    def begin_case(self) -> None:
        self.model.train(self.backward)

    @property
    def supports_graph(self) -> bool:  # the training step (forward + backward) only
        return self.backward

    def _fwdbwd(self, x: Any) -> None:
        with self.autocast():
            out = self.forward(x)
        out.float().mean().backward()

    def step(self, x: Any) -> None:
        if self.backward and self.graphed:
            from blip_fast.cuda_graph import CUDAGraphStep

            key = (_shapes(x), self.dtype, blip_fast.ops.get_backend(), _dispatch_order(), self.execution)
            graphs = getattr(self, "graphs", None) or {}
            if key not in graphs:
                graphs = {key: CUDAGraphStep(self._fwdbwd, x, params=list(self.model.parameters()))}
            self.graphs = graphs
            graphs[key](x)
        elif self.backward:
            self.model.zero_grad(set_to_none=True)
            self._fwdbwd(x)
        else:
            with torch.inference_mode(), self.autocast():
                self.forward(x)

    def cleanup(self) -> None:
        if getattr(self, "model", None) is not None:
            self.model.zero_grad(set_to_none=True)


# -- ViT alone -------------------------------------------------------------------------------------
class VitOnly(EncoderWorkload):
    group = "vit"
    model_key = "blip_vit"

    def build_model(self) -> torch.nn.Module:
        s = self.ctx.sizes
        return self.ctx.shared("blip_vit", lambda: _build(lambda: blip_fast.create_vit(s.vit_base, s.vit_image)[0],
                                                          self.ctx.device))

    def setup(self) -> None:
        self.model = self.build_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net()(x)

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        gen = data.generator(self.ctx.device, self.ctx.seed + batch)
        return [data.images(batch, self.ctx.sizes.vit_image, self.ctx.device, gen) for _ in range(n_sets)]

    def flops(self, batch: int) -> float:
        s = self.ctx.sizes
        return flops.vit_flops(s.vit_base_dims, s.vit_image, batch, self.backward)

    def shape(self, batch: int) -> Dict[str, Any]:
        s = self.ctx.sizes
        return {"images": [batch, 3, s.vit_image, s.vit_image], "vit": _vit_name(s.vit_base),
                "loss": "mean of the output features" if self.backward else None}


# -- text encoder alone ----------------------------------------------------------------------------
class TextOnly(EncoderWorkload):
    group = "text"
    model_key = "blip_text"
    unit = "tok/s"

    def setup(self) -> None:
        s = self.ctx.sizes
        config = load_med_config(dict(s.med) if s.med is not None else "med_config.json")
        self.model = self.ctx.shared("blip_text", lambda: _build(lambda: BertModel(config, add_pooling_layer=False),
                                                                 self.ctx.device))

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        rng = random.Random(self.ctx.seed + batch)
        return [data.captions(self.ctx.tokenizer, batch, self.ctx.sizes.text_len, rng, self.ctx.device)
                for _ in range(n_sets)]

    def forward(self, text: Any) -> torch.Tensor:
        return self.net()(text.input_ids, attention_mask=text.attention_mask, mode="text").last_hidden_state

    def items(self, batch: int) -> float:
        return float(batch * self.ctx.sizes.text_len)

    def flops(self, batch: int) -> float:
        s = self.ctx.sizes
        return flops.text_flops(s.text_dims, s.text_len, batch, self.backward)

    def shape(self, batch: int) -> Dict[str, Any]:
        s = self.ctx.sizes
        return {"tokens": [batch, s.text_len], "layers": s.text_dims.layers, "hidden": s.text_dims.width,
                "note": "tok/s counts padded positions"}


# -- attention op ----------------------------------------------------------------------------------
def attention_shapes(sizes: Sizes, batch: int) -> Dict[str, Dict[str, Any]]:
    """The four attention patterns of BLIP at this configuration's sizes."""
    h, d = sizes.attn_heads, sizes.attn_head_dim
    n_img = (sizes.pretrain_image // 16) ** 2 + 1
    L = sizes.pretrain_len
    return {
        "vit_self": dict(batch=batch, heads=h, lq=n_img, lk=n_img, head_dim=d, mask="none"),
        "bert_self_padding": dict(batch=batch, heads=h, lq=L, lk=L, head_dim=d, mask="padding"),
        "cross": dict(batch=batch, heads=h, lq=L, lk=n_img, head_dim=d, mask="none"),
        "decoder_causal": dict(batch=batch, heads=h, lq=L, lk=L, head_dim=d, mask="causal_padding"),
    }


class AttentionOp(Workload):
    group = "attention"
    unit = "seq/s"
    inputs_depend_on_dtype = True

    def __init__(self, ctx: Context, pattern: str, backward: bool):
        super().__init__(ctx)
        self.pattern = pattern
        self.backward = backward
        self.variant = f"{pattern}/{'fwdbwd' if backward else 'fwd'}"

    def spec(self, batch: int) -> Dict[str, Any]:
        return attention_shapes(self.ctx.sizes, batch)[self.pattern]

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        sp = self.spec(batch)
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        dev = self.ctx.device
        gen = data.generator(dev, self.ctx.seed + batch)
        sets = []
        for _ in range(n_sets):
            b, h, lq, lk, d = sp["batch"], sp["heads"], sp["lq"], sp["lk"], sp["head_dim"]
            q, k, v, g = (torch.randn(b, h, n, d, generator=gen, device=dev).to(dtype) for n in (lq, lk, lk, lq))
            for t in (q, k, v):
                t.requires_grad_(self.backward)
            mask = None
            if sp["mask"] != "none":
                lengths = torch.randint(max(2, lk // 2), lk + 1, (b,), generator=gen, device=dev)
                mask = torch.arange(lk, device=dev)[None, :] < lengths[:, None]
            sets.append((q, k, v, g, mask))
        return sets

    @property
    def causal(self) -> bool:
        return self.pattern == "decoder_causal"

    def attend(self, q, k, v, mask):
        return ops.attention(q, k, v, key_padding_mask=mask, causal=self.causal)

    def step(self, inputs: Any) -> None:
        q, k, v, g, mask = inputs
        if self.backward:
            q.grad = k.grad = v.grad = None
            out = self.attend(q, k, v, mask)
            out.backward(g)
        else:
            with torch.inference_mode():
                self.attend(q, k, v, mask)

    def flops(self, batch: int) -> float:
        sp = self.spec(batch)
        return flops.attention_flops(sp["batch"], sp["heads"], sp["lq"], sp["lk"], sp["head_dim"], self.backward)

    def items(self, batch: int) -> float:
        return float(self.spec(batch)["batch"])

    def shape(self, batch: int) -> Dict[str, Any]:
        return dict(self.spec(batch))


# -- BLIP_Decoder captioning -------------------------------------------------------------------------
class CaptionGenerate(Workload):
    """Captions of random images by beam search, image encoder included (tokens, not strings).

    On the ``reference`` backend this is the reference path: the original's algorithm (self-attention
    ``past_key_values`` tuples, cross-attention keys/values of the image tokens recomputed at every
    step for every beam, per-input Python loops in beam search). On any other backend it is the fast
    path (cross-attention keys/values once per batch, in-place cache, device-side search, CUDA
    graphs on GPUs).
    """

    group = "caption"
    variant = "beam3"
    unit = "captions/s"
    model_key = "blip_decoder"
    supports_compile = False  # the fast path replays its own CUDA graphs; there is no step to compile

    def setup(self) -> None:
        s = self.ctx.sizes
        self.model = self.ctx.shared("blip_decoder", lambda: _build(
            lambda: blip_fast.blip_decoder(image_size=s.caption_image, vit=s.vit_base, **_med_kwargs(s)).eval(),
            self.ctx.device))
        self.lengths: List[int] = []

    def begin_case(self) -> None:
        self.lengths = []
        self.decoding = None

    def make_inputs(self, batch: int, n_sets: int) -> List[Any]:
        gen = data.generator(self.ctx.device, self.ctx.seed + 11 * batch)
        return [data.images(batch, self.ctx.sizes.caption_image, self.ctx.device, gen) for _ in range(n_sets)]

    def generate(self, images: torch.Tensor) -> torch.Tensor:
        s = self.ctx.sizes
        self.decoding = "original" if ops.get_backend() == "reference" else "fast"
        return self.model.generate_ids(images, num_beams=s.caption_beams, max_length=s.caption_max_length,
                                       min_length=s.caption_min_length, decoding=self.decoding)

    def step(self, images: torch.Tensor) -> None:
        with torch.inference_mode(), self.autocast():
            ids = self.generate(images)
        if len(self.lengths) < 64:  # reading the length synchronises: keep it out of most steps
            self.lengths.append(int(ids.shape[1]))

    def details(self, batch: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {"output_lengths_seen": sorted(set(self.lengths))}
        if getattr(self, "decoding", None):
            out["decoding"] = self.decoding
        return out

    def shape(self, batch: int) -> Dict[str, Any]:
        s = self.ctx.sizes
        return {"images": [batch, 3, s.caption_image, s.caption_image], "vit": _vit_name(s.vit_base),
                "num_beams": s.caption_beams, "max_length": s.caption_max_length, "min_length": s.caption_min_length,
                "prompt": "[DEC] a picture of"}

