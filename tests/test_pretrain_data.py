"""The job's data: caption cleaning, BLIP's transforms, JSON / tar-shard / synthetic sources, skipping
of unusable samples, worker-side tokenisation and the resumable sampler."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip_fast.data import (BLIP_AUGS, MEAN, STD, EpochBatchSampler, EvalTransform, ImageTextCollator, JsonImageText,
                            PretrainTransform, RandomAugment, SyntheticShapes, TarShards, TransformedDataset,
                            expand_braces, normalize_images, pre_caption, sample_rng)
from blip_fast.data import randaugment as ra
from blip_fast.data.transforms import random_resized_crop_box
from blip_fast.tokenizer import TokenizedText


# -- captions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, max_words, expected", [
    ("A Dog, running ON the beach!", 50, "a dog, running on the beach"),
    ('He said: "hi" (twice)... #tag ~ok;', 50, "he said hi twice tag ok"),
    ("  leading and trailing  \n", 50, "leading and trailing"),
    ("one two three four five", 3, "one two three"),
    ("keep 'quotes' and-dashes/slashes?", 50, "keep 'quotes' and-dashes/slashes?"),
    ("a\tb", 50, "a\tb"),  # a single tab is not a run of whitespace (as the original)
    ("!!!", 50, ""),
])
def test_pre_caption_matches_the_original_rules(raw, max_words, expected):
    assert pre_caption(raw, max_words) == expected


def test_pre_caption_word_limit_is_thirty_for_pretraining():
    words = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(words, 30).split(" ") == [f"w{i}" for i in range(30)]
    with pytest.raises(TypeError, match="caption must be a string"):
        pre_caption(["not", "a", "string"])


# -- RandAugment and transforms ---------------------------------------------------------------------------
def _image(h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_randaugment_magnitude_five_semantics():
    img = _image()
    # enhance factor (5/10)*1.8+0.1 = 1.0: Brightness and Sharpness leave the image unchanged
    assert ra._args("Brightness", 5, np.random.default_rng(0)) == (1.0,)
    assert np.array_equal(ra.brightness(img, 1.0), img) and np.array_equal(ra.sharpness(img, 1.0), img)
    rng = np.random.default_rng(0)
    assert abs(ra._args("ShearX", 5, rng)[0]) == pytest.approx(0.15)
    assert abs(ra._args("TranslateY", 5, rng)[0]) == pytest.approx(5.0)
    assert abs(ra._args("Rotate", 5, rng)[0]) == pytest.approx(15.0)
    # translation by 5 pixels moves content exactly and fills with grey 128
    out = ra.translate_x(img, 5.0)
    assert np.array_equal(out[:, :-5], img[:, 5:]) and (out[:, -5:] == 128).all()
    # shear about the first pixel centre: row y moves by factor * y
    out = ra.shear_x(img, 0.5)
    assert np.array_equal(out[0], img[0]) and np.array_equal(out[2, 1:], img[2, :-1])
    # autocontrast stretches each channel to the full range; equalize flattens the histogram
    low = (img // 4 + 50).astype(np.uint8)
    stretched = ra.autocontrast(low)
    assert stretched.min() == 0 and stretched.max() >= 254  # the 255 / (hi - lo) scale may truncate to 254
    assert ra.equalize(low).std() > low.std()


def test_randaugment_is_reproducible_and_checks_its_arguments():
    aug = RandomAugment(2, 5, isPIL=True, augs=BLIP_AUGS)
    pil = Image.fromarray(_image())
    a = aug(pil, np.random.default_rng(7))
    b = aug(pil, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == (40, 56, 3) and np.array_equal(a, b)
    outs = {aug(pil, np.random.default_rng(s)).tobytes() for s in range(12)}
    assert len(outs) > 3  # different draws give different images
    with pytest.raises(ValueError, match="unknown RandAugment operation"):
        RandomAugment(2, 5, augs=["Identity", "Blur"])


def test_random_resized_crop_box_stays_inside_and_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(300, 200, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert h * w >= 0.2 * 300 * 200 * 0.9


def test_pretrain_and_eval_transforms_shapes_and_determinism():
    pil = Image.fromarray(_image(120, 90))
    t = PretrainTransform(32, min_scale=0.2)
    a, b = t(pil, sample_rng(1, 0, 5)), t(pil, sample_rng(1, 0, 5))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, t(pil, sample_rng(1, 1, 5)))  # another epoch, another augmentation
    e = EvalTransform(48)(pil)
    assert e.shape == (3, 48, 48) and e.dtype == torch.uint8
    assert torch.equal(e, EvalTransform(48)(pil))


def test_normalize_images_matches_to_tensor_then_normalize():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize_images(x), ref, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(x.float())


# -- sources and skipping ------------------------------------------------------------------------------------
def _png_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def json_data(tmp_path):
    (tmp_path / "img").mkdir()
    for i, color in enumerate(["red", "green", "blue", "yellow"]):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png_bytes(color))
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ann = [
        {"image": "img/0.png", "caption": "A RED square!"},
        {"image": "img/missing.png", "caption": "a missing image"},
        {"image": "img/1.png", "caption": ["a green one", "green, again"]},
        {"image": "img/corrupt.jpg", "caption": "a corrupt image"},
        {"image": "img/2.png", "caption": "   ...   "},  # empty after cleaning
        {"image": "img/3.png", "caption": "a yellow square"},
    ]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return str(path), str(tmp_path)


def test_json_source_skips_missing_corrupt_and_empty_and_counts_them(json_data, blip_tokenizer):
    ann_file, root = json_data
    ds = TransformedDataset(JsonImageText([ann_file], image_root=root), PretrainTransform(32), seed=0)
    assert len(ds) == 6
    s = ds[0]
    assert s.caption == "a red square" and s.image.shape == (3, 32, 32) and not s.skipped
    s = ds[1]  # missing -> replaced by the next usable sample
    assert s.index == 2 and s.caption in ("a green one", "green, again")
    assert [(i, r) for i, r, _ in s.skipped] == [(1, "missing image")]
    s = ds[3]  # corrupt, then empty caption, then usable; only index 3's own failure is reported here
    assert s.index == 5 and [r for _, r, _ in s.skipped] == ["corrupt image"]
    assert [r for _, r, _ in ds[4].skipped] == ["empty caption"]
    loader = DataLoader(ds, batch_size=3, collate_fn=ImageTextCollator(blip_tokenizer, 30))
    batches = list(loader)
    assert isinstance(batches[0].text, TokenizedText) and batches[0].text.input_ids.shape == (3, 30)
    assert batches[0].images.dtype == torch.uint8
    reasons = sorted(r for b in batches for _, r, _ in b.skipped)
    assert reasons == ["corrupt image", "empty caption", "missing image"]


def test_json_source_errors_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"img": "x.png", "text": "no"}]))
    with pytest.raises(ValueError, match='needs "image"'):
        JsonImageText([str(bad)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JsonImageText([str(tmp_path / "nope.json")])
    all_bad = tmp_path / "all_bad.json"
    all_bad.write_text(json.dumps([{"image": f"missing{i}.png", "caption": "x"} for i in range(5)]))
    ds = TransformedDataset(JsonImageText([str(all_bad)]), PretrainTransform(16), seed=0, max_consecutive_skips=3)
    with pytest.raises(RuntimeError, match="consecutive unusable samples.*image_root"):
        ds[0]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_shards_group_members_and_skip_bad_samples(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:02d}.tar", "w") as tar:
            for i in range(3):
                key = f"s{shard}/{i:04d}"
                _add(tar, f"{key}.png", _png_bytes((40 * i, 80, 120)))
                if i == 1:
                    _add(tar, f"{key}.json", json.dumps({"caption": ["Shard caption #1", "another"]}).encode())
                else:
                    _add(tar, f"{key}.txt", f"Caption {shard}-{i}.".encode())
            _add(tar, f"s{shard}/9999.txt", b"caption without an image")
            _add(tar, f"s{shard}/bad.jpg", b"garbage")
            _add(tar, f"s{shard}/bad.txt", b"a corrupt image")
    assert expand_braces(str(tmp_path / "shard-{00..01}.tar")) == [str(tmp_path / "shard-00.tar"),
                                                                   str(tmp_path / "shard-01.tar")]
    src = TarShards(str(tmp_path / "shard-{00..01}.tar"))
    assert len(src) == 8 and src.left_out == {"no image member": 2}
    ds = TransformedDataset(src, PretrainTransform(24), seed=0)
    assert ds[0].caption == "caption 0-0"
    assert ds[1].caption in ("shard caption 1", "another")
    s = ds[3]  # the corrupt jpg of shard 0 -> the first sample of shard 1
    assert s.caption == "caption 1-0" and [r for _, r, _ in s.skipped] == ["corrupt image"]
    import pickle
    assert len(pickle.loads(pickle.dumps(src))) == 8  # picklable for spawned workers


def test_tar_shards_reject_compressed_files(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "a.txt", b"x")
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        TarShards(str(path))


def test_synthetic_dataset_is_deterministic_and_described_by_its_captions():
    src = SyntheticShapes(50, 32, seed=3)
    a_img, a_cap = src.load(7, sample_rng(3, 0, 7))
    b_img, b_cap = SyntheticShapes(50, 32, seed=3).load(7, sample_rng(3, 0, 7))
    assert torch.equal(a_img, b_img) and a_cap == b_cap and a_img.shape == (3, 32, 32)
    c_img, c_cap = src.load(7, sample_rng(3, 1, 7))  # next epoch: same scene, new pixels
    assert src.scene(7) == SyntheticShapes(50, 32, seed=3).scene(7) and not torch.equal(a_img, c_img)
    for obj in src.scene(7):
        assert obj.color in c_cap and obj.shape in c_cap
    val = SyntheticShapes(120, 32, seed=3, split="val", max_objects=1)
    caps = val.captions()
    assert len(set(caps)) == 120
    assert torch.equal(val.load(4, sample_rng(0, 0, 4))[0], val.load(4, sample_rng(9, 9, 4))[0])
    with pytest.raises(ValueError, match="distinct one-object scenes"):
        SyntheticShapes(10_000, 32, split="val", max_objects=1)


def test_synthetic_colours_show_where_the_caption_says():
    src = SyntheticShapes(30, 48, seed=0, max_objects=1)
    for i in range(30):
        img, _ = src.load(i, sample_rng(0, 0, i))
        (obj,) = src.scene(i)
        row, col = divmod(obj.cell, 3)
        cell = img[:, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16].float()
        target = torch.tensor(ra_colour(obj.color), dtype=torch.float32).view(3, 1, 1)
        assert ((cell - target).abs().amax(0) <= 15).any(), (i, obj)


def ra_colour(name):
    from blip_fast.data.synthetic import COLORS
    return COLORS[name]


# -- sampler --------------------------------------------------------------------------------------------------
def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    s = EpochBatchSampler(103, 4, seed=5)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 25 and all(len(b) == 4 for b in full)
    again = EpochBatchSampler(103, 4, seed=5)
    again.set_epoch(2, start_batch=7)
    assert list(again) == full[7:] and len(again) == 18
    s.set_epoch(3)
    assert list(s) != full


def test_sampler_shards_disjointly_across_ranks():
    batches = []
    for rank in range(3):
        s = EpochBatchSampler(60, 5, seed=1, world_size=3, rank=rank)
        s.set_epoch(0)
        batches.append([i for b in s for i in b])
    assert all(len(b) == 20 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(60))
    with pytest.raises(ValueError, match="no full batch"):
        EpochBatchSampler(5, 4, seed=0, world_size=2)


def test_laion_path_adds_one_file_per_epoch(json_data, tmp_path):
    ann_file, root = json_data
    laion = tmp_path / "laion"
    laion.mkdir()
    for k in range(2):
        (laion / f"part{k}.json").write_text(json.dumps([{"image": "img/0.png", "caption": f"laion {k} {i}"}
                                                         for i in range(k + 1)]))
    src = JsonImageText([ann_file], image_root=root, laion_path=str(laion))
    assert len(src) == 6 + 1 and src.annotation[-1]["caption"] == "laion 0 0"
    src.set_epoch(1)
    assert len(src) == 6 + 2 and src.annotation[-1]["caption"] == "laion 1 1"
    src.set_epoch(2)
    assert len(src) == 7
