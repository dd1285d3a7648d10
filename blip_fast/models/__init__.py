"""BLIP models with the original module names (state dicts load key for key)."""
from .blip import create_vit, init_tokenizer, interpolate_pos_embed, load_checkpoint, tie_encoder_decoder_weights
from .blip_itm import BLIP_ITM, blip_itm
from .blip_nlvr import BLIP_NLVR, blip_nlvr
from .blip_pretrain import BLIP_Pretrain, blip_pretrain
from .dual_encoder import DualEncoderOutput, VisionTextDualEncoder, clip_loss
from .med import BertConfig, BertLMHeadModel, BertModel, load_med_config
from .vit import VisionTransformer

__all__ = [
    "BLIP_Pretrain", "blip_pretrain", "BLIP_ITM", "blip_itm", "BLIP_NLVR", "blip_nlvr",
    "VisionTransformer", "create_vit", "interpolate_pos_embed", "BertConfig", "BertModel", "BertLMHeadModel",
    "load_med_config", "init_tokenizer", "load_checkpoint", "tie_encoder_decoder_weights",
    "VisionTextDualEncoder", "DualEncoderOutput", "clip_loss",
]
