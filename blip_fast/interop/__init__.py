"""Weight layouts of other libraries (transformers, timm) <-> blip_fast / original BLIP."""
from .transformers_blip import from_transformers_blip, to_transformers_blip

__all__ = ["from_transformers_blip", "to_transformers_blip"]
