"""The captioning workload of the benchmark suite on the CPU (tiny sizes): the reference backend runs
the original algorithm, the others the fast path, transformers' generate is the peer."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchmarks  # noqa: E402


def test_caption_workload_rows(tmp_path):
    out = tmp_path / "bench"
    assert benchmarks.main(["--workloads", "caption", "--device", "cpu", "--backends", "reference,auto",
                            "--steps", "1", "--warmup", "1", "--input-sets", "1", "--no-plots",
                            "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text(encoding="utf-8"))["results"]
    by_label = {r["label"].split(" ")[0]: r for r in rows}
    assert {"reference", "auto", "transformers"} <= set(by_label)
    assert all(r["status"] == "ok" and r["unit"] == "captions/s" for r in rows), rows
    assert by_label["reference"]["details"]["decoding"] == "original"
    assert by_label["auto"]["details"]["decoding"] == "fast"
    # random weights: every implementation generates up to max_length, the same work per caption
    assert {tuple(r["details"]["output_lengths_seen"]) for r in rows} == {(30,)}
    assert by_label["auto"]["shape"]["num_beams"] == 3
