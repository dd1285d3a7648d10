"""save_pretrained / from_pretrained: config JSON + safetensors, tied weights, offline folders, hub errors."""
import json

import pytest
import torch
from safetensors import safe_open

import blip_fast
from blip_fast import CheckpointError
import blip_fast.models
from blip_fast.models import BLIP_ITM, BLIP_Pretrain
from blip_fast.models.pretrained import tied_weight_groups
from conftest import TINY_MED, TINY_MED_NLVR, TINY_VIT, rel_err
from test_models import IMG, random_tokens


def tiny_pretrain():
    torch.manual_seed(0)
    return BLIP_Pretrain(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16, queue_size=8)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_pretrain_round_trip_keeps_every_tensor_and_every_tie(tmp_path):
    model = tiny_pretrain()
    with torch.no_grad():
        model.queue_ptr.fill_(3)
        model.temp.fill_(0.05)
    folder = model.save_pretrained(tmp_path / "pretrain")
    config = json.loads((tmp_path / "pretrain" / "config.json").read_text())
    assert config["blip_fast_class"] == "BLIP_Pretrain"
    assert config["init_args"]["vit"] == TINY_VIT and config["init_args"]["med_config"]["hidden_size"] == 32
    ties = config["tied_weights"]
    assert ties == tied_weight_groups(model.state_dict()) and len(ties) > 20
    assert ties["text_decoder.cls.predictions.decoder.weight"] == "text_encoder.embeddings.word_embeddings.weight"
    with safe_open(str(tmp_path / "pretrain" / "model.safetensors"), "pt") as f:
        assert not set(ties) & set(f.keys())  # each tied tensor stored once
        assert json.loads(f.metadata()["tied_weights"]) == ties

    loaded = BLIP_Pretrain.from_pretrained(folder)
    assert not loaded.training
    assert_same_state(loaded, model)
    state = loaded.state_dict()
    for alias, key in ties.items():  # shared storage again after load
        assert state[alias].data_ptr() == state[key].data_ptr(), alias
    assert loaded.text_encoder.encoder.layer[0].output.dense.weight is loaded.text_decoder.bert.encoder.layer[0].output.dense.weight
    assert int(loaded.queue_ptr) == 3


def test_outputs_equal_and_generic_loader_and_overrides(tmp_path):
    torch.manual_seed(1)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16).eval()
    model.save_pretrained(tmp_path)
    images, tokens = torch.randn(2, 3, IMG, IMG), random_tokens(2, 35)
    loaded = blip_fast.from_pretrained(tmp_path)  # the class comes from config.json
    assert type(loaded) is BLIP_ITM
    with torch.no_grad():
        assert rel_err(loaded(images, tokens), model(images, tokens)) == 0.0
    half = BLIP_ITM.from_pretrained(str(tmp_path), dtype=torch.bfloat16, vit_grad_ckpt=True)
    assert half.visual_encoder.cls_token.dtype == torch.bfloat16 and half.init_args["vit_grad_ckpt"] is True


def test_ties_the_rebuilt_model_lacks_are_restored(tmp_path):
    torch.manual_seed(2)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16)
    model.text_proj.weight = model.vision_proj.weight  # a user's tie, not made by the constructor
    model.save_pretrained(tmp_path)
    loaded = BLIP_ITM.from_pretrained(tmp_path)
    assert loaded.text_proj.weight is loaded.vision_proj.weight
    assert torch.equal(loaded.text_proj.weight, model.vision_proj.weight)


FAMILY = {
    "BLIP_NLVR": dict(med_config=TINY_MED_NLVR),
    "BLIP_Decoder": dict(prompt="a photo of "),
    "BLIP_Retrieval": dict(embed_dim=16, queue_size=8),
    "BLIP_VQA": {},
    "BLIP_Base": {},
    "VisionTextDualEncoder": dict(projection_dim=16, text_pooler="pooler", projection_bias=True),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_every_model_round_trips(tmp_path, name):
    torch.manual_seed(3)
    cls = getattr(blip_fast.models, name)
    model = cls(**dict(dict(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT), **FAMILY[name]))
    loaded = cls.from_pretrained(model.save_pretrained(tmp_path))
    assert_same_state(loaded, model)
    assert loaded.init_args == {**model.init_args, "med_config": loaded.init_args["med_config"]}
    state = loaded.state_dict()
    for alias, key in tied_weight_groups(model.state_dict()).items():
        assert state[alias].data_ptr() == state[key].data_ptr(), alias


def test_errors_name_the_problem(tmp_path):
    model = tiny_pretrain()
    model.save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="holds a BLIP_Pretrain, not a BLIP_ITM"):
        BLIP_ITM.from_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="does not fit"):
        BLIP_Pretrain.from_pretrained(tmp_path / "p", embed_dim=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="lacks config.json"):
        BLIP_ITM.from_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="cannot be written"):
        BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=dict(TINY_VIT, norm_layer=torch.nn.LayerNorm),
                 embed_dim=16).save_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor"):
        BLIP_ITM.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


def test_hub_name_offline_gives_a_clear_error(tmp_path):
    pytest.importorskip("huggingface_hub")
    with pytest.raises(CheckpointError, match="not in the local cache"):
        BLIP_ITM.from_pretrained("blip-fast-test/no-such-model", cache_dir=str(tmp_path), local_files_only=True)


def test_hub_snapshot_in_the_cache_loads_offline(tmp_path, monkeypatch):
    """A hub name resolves through huggingface_hub.snapshot_download (stubbed to a folder here)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    torch.manual_seed(4)
    model = BLIP_ITM(med_config=TINY_MED, image_size=IMG, vit=TINY_VIT, embed_dim=16)
    model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = BLIP_ITM.from_pretrained("someone/blip-itm-tiny", revision="v1")
    assert_same_state(loaded, model)
    assert calls[0][0] == "someone/blip-itm-tiny" and calls[0][1]["revision"] == "v1"
    assert set(calls[0][1]["allow_patterns"]) == {"config.json", "model.safetensors"}
