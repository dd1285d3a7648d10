"""Weight layouts of other libraries (transformers, timm) <-> blip_fast / original BLIP."""
from .transformers_blip import from_transformers_blip, to_transformers_blip

# Whole-model conversion, BERT / timm towers, the BlipModel layout (dual encoder).
from .bert import load_bert_weights  # noqa: E402
from .timm_vit import load_timm_vit  # noqa: E402
from .towers import BERT_BASE_UNCASED, DEIT_BASE_URL, VIT_LARGE_IN21K_URL, load_pretrained_towers  # noqa: E402
from .transformers_blip_model import from_transformers_blip_model, to_transformers_blip_model  # noqa: E402
from .transformers_models import (  # noqa: E402
    from_transformers,
    load_transformers_blip,
    save_transformers,
    to_transformers,
)

__all__ = ["from_transformers_blip", "to_transformers_blip",
           "from_transformers", "to_transformers", "save_transformers", "load_transformers_blip",
           "from_transformers_blip_model", "to_transformers_blip_model",
           "load_bert_weights", "load_timm_vit", "load_pretrained_towers",
           "DEIT_BASE_URL", "VIT_LARGE_IN21K_URL", "BERT_BASE_UNCASED"]
