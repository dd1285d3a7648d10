"""BLIP models with the original module names (state dicts load key for key)."""
from .blip import create_vit, init_tokenizer, interpolate_pos_embed, load_checkpoint, tie_encoder_decoder_weights
from .blip_base import BLIP_Base, blip_feature_extractor
from .blip_decoder import BLIP_Decoder, blip_decoder
from .blip_itm import BLIP_ITM, blip_itm
from .blip_nlvr import BLIP_NLVR, blip_nlvr
from .blip_pretrain import BLIP_Pretrain, blip_pretrain
from .blip_retrieval import BLIP_Retrieval, blip_retrieval
from .blip_vqa import BLIP_VQA, blip_vqa
from .kv_cache import DecoderKVCache
from .dual_encoder import DualEncoderOutput, VisionTextDualEncoder, clip_loss
from .med import BertConfig, BertLMHeadModel, BertModel, load_med_config
from .vit import VisionTransformer

__all__ = [
    "BLIP_Pretrain", "blip_pretrain", "BLIP_ITM", "blip_itm", "BLIP_NLVR", "blip_nlvr",
    "BLIP_Decoder", "blip_decoder", "BLIP_Retrieval", "blip_retrieval", "BLIP_VQA", "blip_vqa",
    "BLIP_Base", "blip_feature_extractor", "DecoderKVCache",
    "VisionTransformer", "create_vit", "interpolate_pos_embed", "BertConfig", "BertModel", "BertLMHeadModel",
    "load_med_config", "init_tokenizer", "load_checkpoint", "tie_encoder_decoder_weights",
    "VisionTextDualEncoder", "DualEncoderOutput", "clip_loss",
]
