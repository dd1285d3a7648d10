"""Loading checkpoints in the original layout: what the original loaders keep, drop, duplicate
and interpolate, reported clearly; unsafe pickles refused."""
import collections
import json
import os
import pickle

import pytest
import torch

import blip_fast
from blip_fast.checkpoint import CheckpointError, load_checkpoint
from blip_fast.models import blip_itm, blip_nlvr
from blip_fast.models.blip_nlvr import load_checkpoint as load_nlvr_checkpoint
from blip_fast.models.vit import interpolate_pos_embed
from test_state_dicts import REFERENCE, load_facts



def checkpoint_from_facts(name, seed=0):
    """A state dict with the original model's keys, shapes, dtypes and shared tensors, random values."""
    facts = load_facts(name)
    g = torch.Generator().manual_seed(seed)
    shared = {}
    for group in facts["tied_groups"]:
        for key in group:
            shared[key] = group[0]
    state = {}
    for record in facts["state_dict"]:
        key = record["key"]
        if key in shared and shared[key] in state:
            state[key] = state[shared[key]]
            continue
        dtype = getattr(torch, record["dtype"])
        if dtype.is_floating_point:
            state[key] = torch.randn(record["shape"], generator=g, dtype=dtype)
        else:
            state[key] = torch.randint(0, 100, record["shape"], generator=g, dtype=dtype)
    return state


@pytest.fixture(scope="module")
def pretrain_checkpoint(tmp_path_factory):
    """An original BLIP_Pretrain (base, 224) checkpoint file, the way fine-tuning starts."""
    state = checkpoint_from_facts("blip_pretrain")
    path = tmp_path_factory.mktemp("ckpt") / "model_base.pth"
    torch.save({"model": state, "epoch": 19, "config": {"image_size": 224}}, path)
    return path, state


def by_prefix(keys):
    return dict(collections.Counter(k.split(".")[0] for k in keys))


@pytest.mark.slow
def test_base_itm_loads_pretrain_checkpoint(pretrain_checkpoint):
    path, state = pretrain_checkpoint
    facts = load_facts("blip_itm")["loading"]["load_from_blip_pretrain_224_checkpoint"]
    model = blip_itm(pretrained=str(path), image_size=384, vit="base")
    _, report = load_checkpoint(model, str(path))
    assert report.missing_keys == facts["missing_keys"] == []
    assert by_prefix(report.unexpected_keys) == facts["unexpected_keys_by_prefix"]
    assert report.mismatched_keys == {}
    assert report.interpolated == {"visual_encoder.pos_embed": (197, 577)}
    loaded = model.state_dict()
    expected_pos = interpolate_pos_embed(state["visual_encoder.pos_embed"], model.visual_encoder)
    assert torch.equal(loaded["visual_encoder.pos_embed"], expected_pos)
    for key in ("text_encoder.encoder.layer.3.crossattention.self.key.weight", "itm_head.weight",
                "visual_encoder.blocks.11.mlp.fc2.bias", "text_encoder.embeddings.word_embeddings.weight"):
        assert torch.equal(loaded[key], state[key]), key


@pytest.mark.slow
def test_base_nlvr_duplicates_cross_attention(pretrain_checkpoint):
    path, state = pretrain_checkpoint
    facts = load_facts("blip_nlvr")["loading"]["load_from_blip_pretrain_224_checkpoint"]
    model = blip_nlvr(image_size=384, vit="base")
    _, report = load_nlvr_checkpoint(model, str(path))
    assert sorted(report.missing_keys) == sorted(facts["missing_keys"])
    assert by_prefix(report.unexpected_keys) == facts["unexpected_keys_by_prefix"]
    duplicated = {k: v for k, v in report.duplicated_from.items() if k.startswith("text_encoder.")}
    assert duplicated == {k: v for k, v in facts["duplicated_from"].items()}
    loaded = model.state_dict()
    for new_key, old_key in list(duplicated.items())[:8]:
        assert torch.equal(loaded[new_key], state[old_key])


def test_missing_keys_are_named(tmp_path):
    from conftest import TINY_MED
    model = blip_itm(image_size=32, vit={"embed_dim": 32, "depth": 1, "num_heads": 2}, med_config=TINY_MED)
    state = model.state_dict()
    del state["itm_head.weight"]
    state["not_a_key"] = torch.randn(2)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    _, report = load_checkpoint(model, str(path))
    assert report.missing_keys == ["itm_head.weight"] and report.unexpected_keys == ["not_a_key"]
    with pytest.raises(CheckpointError, match="itm_head.weight"):
        blip_itm(pretrained=str(path), image_size=32, vit={"embed_dim": 32, "depth": 1, "num_heads": 2},
                 med_config=TINY_MED)


def test_shape_mismatch_is_reported_not_silent(tmp_path):
    from conftest import TINY_MED
    vit = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    model = blip_itm(image_size=32, vit=vit, med_config=TINY_MED)
    state = model.state_dict()
    state["vision_proj.weight"] = torch.randn(128, 32)
    torch.save({"model": state}, tmp_path / "m.pth")
    _, report = load_checkpoint(model, str(tmp_path / "m.pth"))
    assert report.mismatched_keys == {"vision_proj.weight": ((128, 32), (256, 32))}
    assert "vision_proj.weight" in report.missing_keys
    assert "shape mismatch" in str(report)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": torch.zeros(1)}, "payload": _Exploit()}, f)
    from conftest import TINY_MED
    model = blip_itm(image_size=32, vit={"embed_dim": 32, "depth": 1, "num_heads": 2}, med_config=TINY_MED)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(model, str(path))


def test_bad_path_is_a_clear_error():
    from conftest import TINY_MED
    model = blip_itm(image_size=32, vit={"embed_dim": 32, "depth": 1, "num_heads": 2}, med_config=TINY_MED)
    with pytest.raises(CheckpointError, match="neither an http"):
        load_checkpoint(model, "no/such/file.pth")


def test_interpolate_pos_embed_bicubic_and_identity():
    from blip_fast.models.vit import VisionTransformer
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=8, depth=1, num_heads=2)
    ckpt = torch.randn(1, 1 + 9, 8)  # a 3x3 grid -> 4x4
    out = interpolate_pos_embed(ckpt, vit)
    assert out.shape == (1, 17, 8) and torch.equal(out[:, 0], ckpt[:, 0])
    grid = ckpt[:, 1:].reshape(1, 3, 3, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).flatten(1, 2))
    same = torch.randn(1, 17, 8)
    assert interpolate_pos_embed(same, vit) is same
