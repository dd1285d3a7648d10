"""BLIP's tokenizer against the reference facts (special tokens, ids, every padding mode)."""
import json
import re

import pytest

from test_state_dicts import REFERENCE


def facts():
    with open(REFERENCE / "tokenizer.json") as f:
        return json.load(f)


def test_special_tokens(blip_tokenizer):
    f = facts()
    assert len(blip_tokenizer) == f["len_tokenizer"] == 30524
    for token, idx in f["special_tokens"].items():
        assert blip_tokenizer.convert_tokens_to_ids(token) == idx
    assert blip_tokenizer.enc_token_id == f["ids"]["enc_token_id"]
    assert blip_tokenizer.bos_token_id == f["ids"]["bos_token_id"]
    assert blip_tokenizer.bos_token == f["bos_token"]


@pytest.mark.parametrize("name", list(facts()["examples"]))
def test_encodings_match_original(blip_tokenizer, name):
    example = facts()["examples"][name]
    padding = re.search(r"padding=(\w+)", name).group(1)
    max_length = re.search(r"max_length=(\d+)", name)
    kwargs = {"padding": padding, "return_tensors": "pt"}
    if max_length:
        kwargs.update(truncation=True, max_length=int(max_length.group(1)))
    out = blip_tokenizer(example["texts"], **kwargs)
    assert out["input_ids"].tolist() == example["input_ids"]
    assert out["attention_mask"].tolist() == example["attention_mask"]


def test_offline_sources(tmp_path, monkeypatch):
    from blip_fast.tokenizer import VOCAB_ENV, find_packaged_vocab, init_tokenizer
    vocab = find_packaged_vocab()
    if vocab is None:
        pytest.skip("no packaged vocabulary")
    (tmp_path / "vocab.txt").write_bytes(open(vocab, "rb").read())
    assert len(init_tokenizer(str(tmp_path))) == 30524
    monkeypatch.setenv(VOCAB_ENV, str(tmp_path / "vocab.txt"))
    assert len(init_tokenizer()) == 30524
    monkeypatch.setenv(VOCAB_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match=VOCAB_ENV):
        init_tokenizer()
