"""blip_fast: BLIP (Li et al., 2022) as a fast, kernel-backed, drop-in PyTorch library.

Models keep the original module names and load the original checkpoints unchanged; every hot op
goes through :mod:`blip_fast.ops`, whose backend is chosen with :func:`use_backend`,
:func:`set_backend` or the ``BLIP_FAST_BACKEND`` environment variable.
"""
__version__ = "0.1.0"

from ._kernel_sources import register_source_kernels as _register_source_kernels  # noqa: E402

_register_source_kernels()

from .ops import (  # noqa: E402
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)

from .checkpoint import CheckpointError, LoadReport, load_checkpoint  # noqa: E402
from .models import (  # noqa: E402
    BLIP_ITM,
    BLIP_NLVR,
    BLIP_Pretrain,
    BertLMHeadModel,
    VisionTextDualEncoder,
    BertModel,
    VisionTransformer,
    blip_itm,
    blip_nlvr,
    blip_pretrain,
    create_vit,
)
from .models import (  # noqa: E402
    BLIP_VQA,
    BLIP_Base,
    BLIP_Decoder,
    BLIP_Retrieval,
    blip_decoder,
    blip_feature_extractor,
    blip_retrieval,
    blip_vqa,
)
from .generation import GenerationConfig  # noqa: E402
from .tokenizer import TokenizedText, init_tokenizer, tokenize  # noqa: E402
from .models.pretrained import PretrainedMixin  # noqa: E402

from_pretrained = PretrainedMixin.from_pretrained  # any model saved with save_pretrained

__all__ = [
    "__version__", "use_backend", "set_backend", "get_backend", "available_backends", "BackendUnavailableError",
    "BLIP_Pretrain", "blip_pretrain", "BLIP_ITM", "blip_itm", "BLIP_NLVR", "blip_nlvr", "VisionTransformer",
    "create_vit", "BertModel", "BertLMHeadModel", "load_checkpoint", "LoadReport", "CheckpointError",
    "init_tokenizer", "tokenize", "TokenizedText",
    "BLIP_Decoder", "blip_decoder", "BLIP_Retrieval", "blip_retrieval", "BLIP_VQA", "blip_vqa", "BLIP_Base",
    "blip_feature_extractor", "GenerationConfig",
    "VisionTextDualEncoder", "from_pretrained",
]
