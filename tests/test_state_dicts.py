"""Key-for-key compatibility with the original checkpoints, from ../shared/reference/state_dicts.

The facts live in tests/reference (copied from the original models, see its README.md). Every key, its order, shape, dtype, kind (parameter / buffer), requires_grad and the groups of
keys sharing one tensor must equal the original model's. Models are built on the meta device
(no memory, no init) since only the layout is compared.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from blip_fast.models import (blip_decoder, blip_feature_extractor, blip_itm, blip_nlvr, blip_pretrain,
                              blip_retrieval, blip_vqa)

# A copy of the project's reference facts about the original checkpoints (tests/reference/README.md).
REFERENCE = Path(os.environ.get("BLIP_FAST_REFERENCE", Path(__file__).resolve().parent / "reference"))
FACTORIES = {"blip_pretrain": blip_pretrain, "blip_itm": blip_itm, "blip_nlvr": blip_nlvr,
             "blip_decoder": blip_decoder, "blip_retrieval": blip_retrieval, "blip_vqa": blip_vqa,
             "blip_feature_extractor": blip_feature_extractor}
FILES = sorted(p.stem for p in (REFERENCE / "state_dicts").glob("*.json")) if REFERENCE.exists() else []
IN_SCOPE = [f for f in FILES if f.replace("_large", "") in FACTORIES]



def load_facts(name):
    with open(REFERENCE / "state_dicts" / f"{name}.json") as f:
        return json.load(f)


def build(name, **overrides):
    facts = load_facts(name)
    kwargs = dict(facts["constructor_kwargs"], **overrides)
    kwargs["med_config"] = os.path.basename(kwargs["med_config"])  # the shipped copies
    with torch.device("meta"):
        return FACTORIES[facts["factory"]](**kwargs), facts


def test_every_in_scope_file_is_covered():
    expected = {"blip_pretrain", "blip_itm", "blip_nlvr", "blip_pretrain_large", "blip_itm_large", "blip_decoder",
                "blip_decoder_large", "blip_retrieval", "blip_retrieval_large", "blip_vqa", "blip_feature_extractor"}
    assert expected <= set(IN_SCOPE)
    assert set(IN_SCOPE) == set(FILES)  # every reference file is checked


@pytest.mark.parametrize("name", IN_SCOPE)
def test_state_dict_matches_original(name):
    model, facts = build(name)
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    assert len(state) == facts["num_state_dict_keys"]
    assert list(state) == [r["key"] for r in facts["state_dict"]]
    for record in facts["state_dict"]:
        tensor = state[record["key"]]
        assert list(tensor.shape) == record["shape"], record["key"]
        assert str(tensor.dtype).replace("torch.", "") == record["dtype"], record["key"]
        assert ("parameter" if id(tensor) in params else "buffer") == record["kind"], record["key"]
        if record["kind"] == "parameter":
            assert tensor.requires_grad == record["requires_grad"], record["key"]

    groups = {}
    for key, tensor in state.items():
        groups.setdefault(id(tensor), []).append(key)
    tied = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    assert tied == sorted(sorted(g) for g in facts["tied_groups"])
    assert len(groups) == facts["num_unique_tensors"]
    unique = {id(p): p for p in model.parameters()}
    assert sum(p.numel() for p in unique.values()) == facts["num_parameters"]
    assert sum(p.numel() for p in unique.values() if p.requires_grad) == facts["num_trainable_parameters"]

    buffers = dict(model.named_buffers())
    for record in facts["buffers"]:
        assert record["name"] in buffers and record["persistent"] == (record["name"] in state)


@pytest.mark.parametrize("name", [n for n in IN_SCOPE if "vit_grad_ckpt_true_ckpt_layer_4_same_keys" in
                                  (load_facts(n).get("loading") or {})])
def test_activation_checkpointing_keeps_keys(name):
    plain, _ = build(name)
    ckpt, _ = build(name, vit_grad_ckpt=True, vit_ckpt_layer=4)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    flags = [blk.use_grad_checkpointing for blk in ckpt.visual_encoder.blocks]
    assert flags == [False] * (len(flags) - 4) + [True] * 4


@pytest.mark.parametrize("name", ["blip_pretrain", "blip_retrieval", "blip_retrieval_large"])
def test_momentum_pairs_match(name):
    model, facts = build(name)
    pairs = [[type(m).__name__ for m in pair] for pair in model.model_pairs]
    names = {id(m): n for n, m in model.named_children()}
    assert [[names[id(m)] for m in pair] for pair in model.model_pairs] == facts["loading"]["momentum_pairs"]
    assert all(a == b for a, b in pairs)


@pytest.mark.parametrize("name", [n for n in IN_SCOPE if "load_from_blip_pretrain_224_checkpoint" in
                                  (load_facts(n).get("loading") or {}) and n not in ("blip_nlvr",)])
def test_loading_a_pretrain_checkpoint_keeps_and_drops_what_the_original_does(name):
    """Key-level outcome of loading a BLIP_Pretrain (base, 224) checkpoint (meta tensors: the
    keys decide missing / unexpected, the loader's pos-embed step is tested in test_checkpoint)."""
    import collections
    from blip_fast.checkpoint import LoadReport, apply_state_dict
    facts = load_facts(name)["loading"]["load_from_blip_pretrain_224_checkpoint"]
    model, _ = build(name)
    pretrain = load_facts("blip_pretrain")
    state = {r["key"]: torch.empty(r["shape"], dtype=getattr(torch, r["dtype"]), device="meta")
             for r in pretrain["state_dict"]}
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state and key in model.state_dict():  # what the interpolation does to the shape
            state[key] = torch.empty(model.state_dict()[key].shape, device="meta")
    report = apply_state_dict(model, state, LoadReport())
    assert sorted(report.missing_keys) == sorted(facts["missing_keys"])
    assert dict(collections.Counter(k.split(".")[0] for k in report.unexpected_keys)) == \
        facts["unexpected_keys_by_prefix"]
    assert not report.mismatched_keys
