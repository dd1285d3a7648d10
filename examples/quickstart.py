"""Quick start: the drop-in BLIP models on the CPU, at a small size, with the default backend.

Builds a small BLIP_ITM and BLIP_Pretrain (random weights), scores captions against images,
runs a few pretraining steps and shows which backend ran each op.
"""
import time

import torch

import blip_fast
from blip_fast import blip_itm, blip_pretrain

torch.manual_seed(0)
vit = {"embed_dim": 64, "depth": 2, "num_heads": 2}
med = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
       "vocab_size": 30524, "encoder_width": 64, "add_cross_attention": True, "max_position_embeddings": 64,
       "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
       "layer_norm_eps": 1e-12, "initializer_range": 0.02, "pad_token_id": 0}
captions = ["a red square on a white background", "two blue circles", "a green triangle", "a yellow star"]
images = torch.randn(4, 3, 64, 64)

itm = blip_itm(image_size=64, vit=vit, med_config=med).eval()
with torch.no_grad():
    print("ITM match probability:", itm(images, captions, match_head="itm").softmax(-1)[:, 1].tolist())
    print("ITC similarity matrix:\n", itm(images, captions, match_head="itc"))

model = blip_pretrain(image_size=64, vit=vit, med_config=med, queue_size=64)
tokens = blip_fast.tokenize(model.tokenizer, captions, padding="max_length", max_length=30)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
for step in range(3):
    start = time.perf_counter()
    loss_ita, loss_itm, loss_lm = model(images, tokens, alpha=0.4)
    loss = loss_ita + loss_itm + loss_lm
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    print(f"step {step}: ita {loss_ita.item():.3f} itm {loss_itm.item():.3f} lm {loss_lm.item():.3f} "
          f"({time.perf_counter() - start:.2f}s)")
print("backends here:", {k: ("ok" if v is None else v) for k, v in blip_fast.available_backends().items()})
