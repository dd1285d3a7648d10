"""The pretraining job end to end on the CPU with a micro model: config and CLI, BLIP's schedules, a
few-step run, exact resume after a SIGKILL, non-finite steps, torchrun with two processes."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from blip_fast.train import commands
from blip_fast.train.config import PretrainConfig, apply_overrides, load_config
from blip_fast.train.job import NonFiniteLossError, run_pretrain
from blip_fast.train.reporting import read_jsonl
from blip_fast.train.schedule import alpha_at, build_optimizer, lr_at

from conftest import TINY_MED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MICRO = {
    "dataset": "synthetic", "synthetic": {"train_size": 20, "eval_size": 8, "max_objects": 1},
    "vit": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 16}, "image_size": 32,
    "med_config": dict(TINY_MED, num_hidden_layers=1), "embed_dim": 16, "batch_size": 4, "queue_size": 16,
    "init_lr": 1e-3, "warmup_lr": 1e-5, "warmup_steps": 3, "max_epoch": 2, "num_workers": 0, "log_every": 1,
    "checkpoint_every": 4, "save_epoch_checkpoints": False, "eval_every_epochs": 1, "k_test": 4,
    "eval_itm": "always", "plot": False, "progress_bar": "off", "backend": "reference", "seed": 1,
}


def micro_config(**changes):
    values = copy.deepcopy(MICRO)
    values.update(changes)
    return PretrainConfig.from_dict(values)


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _cli(*args):
    return [sys.executable, "-m", "blip_fast.cli", *args]


# -- config and schedules ---------------------------------------------------------------------------------
def test_shipped_configs_parse_and_mirror_blips_pretrain_yaml():
    base = load_config("pretrain", ["train_file=[a.json]"])
    assert (base.vit, base.image_size, base.batch_size, base.queue_size, base.alpha) == ("base", 224, 75, 57600, 0.4)
    assert (base.weight_decay, base.init_lr, base.min_lr, base.warmup_lr) == (0.05, 3e-4, 1e-6, 1e-6)
    assert (base.lr_decay_rate, base.max_epoch, base.warmup_steps) == (0.9, 20, 3000)
    assert isinstance(base.init_lr, float)  # '3e-4' is a string to YAML 1.1
    tiny = load_config("pretrain_tiny")
    assert tiny.dataset == "synthetic" and tiny.image_size <= 96


def test_config_overrides_and_errors():
    values = apply_overrides({"vit": {"embed_dim": 64}}, ["batch_size=8", "vit.depth=2", "init_lr=1e-3",
                                                          "train_file=[x.json, y.json]", "synthetic.eval_size=5"])
    assert values["batch_size"] == 8 and values["vit"] == {"embed_dim": 64, "depth": 2}
    assert values["init_lr"] == 1e-3 and values["train_file"] == ["x.json", "y.json"]
    assert values["synthetic"]["eval_size"] == 5 and values["synthetic"]["train_size"] == 100000
    cfg = PretrainConfig.from_dict({"dataset": "synthetic", "synthetic": {"eval_size": 5}})
    assert cfg.synthetic == {"train_size": 100000, "eval_size": 5, "max_objects": 2}  # merged with the defaults
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        PretrainConfig.from_dict({"batchsize": 4})
    with pytest.raises(ValueError, match="did you mean 'queue_size'"):
        apply_overrides({}, ["queue_sise=4"])
    with pytest.raises(ValueError, match="needs train_file"):
        PretrainConfig.from_dict({"dataset": "json"})
    with pytest.raises(ValueError, match="amp must be one of"):
        PretrainConfig.from_dict(dict(MICRO, amp="fp16"))
    assert commands._key_overrides(["--batch_size", "8", "--vit.depth=2", "--alpha", "0.2"], "p") == [
        "batch_size=8", "vit.depth=2", "alpha=0.2"]


def _original_warmup_lr_schedule(optimizer, step, max_step, init_lr, max_lr):
    lr = min(max_lr, init_lr + (max_lr - init_lr) * step / max_step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def _original_step_lr_schedule(optimizer, epoch, init_lr, min_lr, decay_rate):
    lr = max(min_lr, init_lr * (decay_rate ** epoch))
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def test_schedules_equal_blips_formulas():
    cfg = load_config("pretrain", ["train_file=[a.json]", "warmup_steps=30", "max_epoch=30"])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, torch.device("cpu"))
    assert opt.defaults["weight_decay"] == 0.05 and opt.defaults["lr"] == 3e-4
    steps_per_epoch = 17
    for epoch in range(cfg.max_epoch):
        _original_step_lr_schedule(opt, epoch, cfg.init_lr, cfg.min_lr, cfg.lr_decay_rate)
        for i in range(steps_per_epoch):
            if epoch == 0:
                _original_warmup_lr_schedule(opt, i, cfg.warmup_steps, cfg.warmup_lr, cfg.init_lr)
            assert lr_at(cfg, epoch, i) == opt.param_groups[0]["lr"]
            original_alpha = cfg.alpha * min(1, (epoch * steps_per_epoch + i) / (2 * steps_per_epoch))
            assert alpha_at(cfg, epoch, i, steps_per_epoch) == original_alpha
    assert lr_at(cfg, 29, 0) == cfg.min_lr or lr_at(cfg, 29, 0) == cfg.init_lr * 0.9 ** 29
    one_epoch = load_config("pretrain", ["train_file=[a.json]", "alpha_ramp_epochs=1"])
    assert alpha_at(one_epoch, 0, 5, 10) == pytest.approx(0.4 * 0.5) and alpha_at(one_epoch, 1, 0, 10) == 0.4


def test_pretrain_help_lists_the_options_and_keys(capsys):
    from blip_fast.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--config", "--resume", "--output-dir", "--amp", "--set", "warmup_lr", "queue_size"):
        assert word in out


# -- runs -------------------------------------------------------------------------------------------------------
def test_few_step_run_logs_checkpoints_and_evaluates(tmp_path, blip_tokenizer):
    out = str(tmp_path / "run")
    result = run_pretrain(micro_config(max_steps=6), out, device="cpu")
    assert result.global_step == 6 and result.checkpoint.endswith("checkpoint_last.pth")
    records = read_jsonl(os.path.join(out, "log.jsonl"))
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor([r["loss_ita"], r["loss_itm"], r["loss_lm"]])).all() for r in steps)
    assert steps[0]["lr"] == pytest.approx(1e-5) and steps[3]["lr"] == pytest.approx(1e-3)  # warm-up, 3 steps
    assert steps[0]["alpha"] == 0.0 and steps[5]["alpha"] == pytest.approx(0.4 * 5 / 10)
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2 and {"itc_txt_r1", "txt_r1", "img_r10"} <= set(evals[0])  # epoch end + max_steps
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["position"] == {"epoch": 1, "batch": 1, "global_step": 6} and state["epoch"] == 0
    # the checkpoint's model is a BLIP_Pretrain state dict the standard loader takes
    from blip_fast import blip_pretrain, load_checkpoint
    model = blip_pretrain(image_size=32, vit=MICRO["vit"], med_config=MICRO["med_config"], embed_dim=16, queue_size=16)
    _, report = load_checkpoint(model, result.checkpoint)
    assert not report.missing_keys and not report.unexpected_keys
    assert torch.equal(model.queue_ptr, state["model"]["queue_ptr"])


def test_nonfinite_step_is_skipped_and_the_queue_restored(tmp_path, blip_tokenizer):
    out = str(tmp_path / "nan1")
    from blip_fast.train.job import PretrainJob
    from blip_fast.train.runtime import init_runtime
    job = PretrainJob(micro_config(max_steps=4, eval_every_epochs=0, fault_injection={"nan_steps": [3]}), out,
                      init_runtime("cpu"))
    result = job.run()
    steps = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "step"]
    assert [r["skipped"] for r in steps] == [False, False, True, False] and result.global_step == 4
    assert steps[2]["loss_ita"] != steps[2]["loss_ita"]  # NaN logged as such
    assert torch.isfinite(job.model.image_queue).all() and torch.isfinite(job.model.text_queue).all()
    assert int(job.model.queue_ptr) == (3 * 4) % 16  # the skipped step's enqueue was undone
    assert all(torch.isfinite(p).all() for p in job.model.parameters())


def test_too_many_nonfinite_steps_stop_with_the_last_checkpoint_intact(tmp_path, blip_tokenizer):
    out = str(tmp_path / "nan2")
    cfg = micro_config(max_steps=20, checkpoint_every=2, eval_every_epochs=0, nonfinite_patience=3,
                       fault_injection={"nan_steps": [3, 4, 5]})
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .*checkpoint_last.pth \(step 2\)"):
        run_pretrain(cfg, out, device="cpu")
    state = torch.load(os.path.join(out, "checkpoint_last.pth"), weights_only=True)
    assert state["position"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the CLI reports it and exits non-zero
    yaml_path = tmp_path / "nan.yaml"
    yaml_path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert commands.pretrain_main(["--config", str(yaml_path), "--output-dir", str(tmp_path / "nan3"),
                                   "--device", "cpu"]) == 3


def test_json_data_run_counts_unreadable_samples_in_bf16(tmp_path, blip_tokenizer):
    from PIL import Image
    for i, color in enumerate(["red", "green", "blue", "white", "black", "yellow", "purple"]):
        Image.new("RGB", (48, 40), color).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    ann = [{"image": f"{i}.png", "caption": f"a {c} picture"} for i, c in enumerate(
        ["red", "green", "blue", "white", "black", "yellow", "purple"])]
    ann += [{"image": "bad.jpg", "caption": "corrupt"}, {"image": "gone.png", "caption": "missing"}]
    (tmp_path / "train.json").write_text(json.dumps(ann))
    cfg = micro_config(dataset="json", train_file=[str(tmp_path / "train.json")], image_root=str(tmp_path),
                       max_epoch=2, eval_file=str(tmp_path / "train.json"), amp="bf16", checkpoint_every=0)
    result = run_pretrain(cfg, str(tmp_path / "run"), device="cpu")
    assert result.global_step == 4  # 9 annotations, batch 4: 2 steps per epoch
    records = read_jsonl(os.path.join(str(tmp_path / "run"), "log.jsonl"))
    steps = [r for r in records if r["kind"] == "step"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    seen = steps[-1]["skipped_samples"]
    assert set(seen) <= {"corrupt image", "missing image"} and sum(seen.values()) >= 1
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["skipped_images"] == 2 and evals[-1]["num_images"] == 7  # the corrupt and the missing one


def test_sigterm_checkpoints_and_stops(tmp_path, blip_tokenizer):
    cfg = micro_config(max_steps=50, max_epoch=20, checkpoint_every=0, eval_every_epochs=0,
                       fault_injection={"step_sleep": 0.2})
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out_dir = str(tmp_path / "term")
    proc = subprocess.Popen(_cli("pretrain", "--config", str(path), "--output-dir", out_dir, "--device", "cpu"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reached = _wait_for_step(os.path.join(out_dir, "log.jsonl"), 3, proc, timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    state = torch.load(os.path.join(out_dir, "checkpoint_last.pth"), weights_only=True)
    assert reached <= state["position"]["global_step"] < 50 and "continue with --resume" in out


def _wait_for_step(log_path, step, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()}")
        if os.path.exists(log_path):
            steps = [r["step"] for r in read_jsonl(log_path) if r.get("kind") == "step"]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_killed_run_resumes_exactly(tmp_path, blip_tokenizer):
    """SIGKILL a real run after its step-4 checkpoint, resume it, and compare with a run never killed:
    the same losses at every step and the same final weights, optimiser state and queues."""
    cfg = micro_config(max_steps=12, num_workers=1, max_epoch=3, synthetic={"train_size": 24, "eval_size": 8,
                                                                            "max_objects": 1})
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    killed_cfg = tmp_path / "micro_slow.yaml"
    killed_cfg.write_text(yaml.safe_dump(dict(cfg.to_dict(), fault_injection={"step_sleep": 0.5})))
    ref_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
    args = ["--device", "cpu"]
    reference = subprocess.Popen(_cli("pretrain", "--config", str(path), "--output-dir", ref_dir, *args),
                                 env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_cli("pretrain", "--config", str(killed_cfg), "--output-dir", run_dir, *args),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reached = _wait_for_step(os.path.join(run_dir, "log.jsonl"), 5, victim, timeout=120)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert reached < 6  # killed after the step-4 checkpoint, before the epoch-end one: step 5 is lost
    state = torch.load(os.path.join(run_dir, "checkpoint_last.pth"), weights_only=True)
    assert state["position"]["global_step"] == 4
    # resume from the checkpoint (its stored config, minus the sleep)
    resumed = subprocess.run(_cli("pretrain", "--resume", "--output-dir", run_dir, "--set", "fault_injection={}",
                                  *args), env=_env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_out, ref_err = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_err[-3000:]

    def steps(d):
        return [r for r in read_jsonl(os.path.join(d, "log.jsonl")) if r["kind"] == "step"]

    ref_steps, run_steps = steps(ref_dir), steps(run_dir)
    assert [r["step"] for r in run_steps] == list(range(1, 13))  # the killed run's step 5 was replaced
    for a, b in zip(ref_steps, run_steps):
        assert (a["loss_ita"], a["loss_itm"], a["loss_lm"], a["lr"], a["alpha"]) == \
               (b["loss_ita"], b["loss_itm"], b["loss_lm"], b["lr"], b["alpha"]), a["step"]
    evals_ref = [r["txt_r1"] for r in read_jsonl(os.path.join(ref_dir, "log.jsonl")) if r["kind"] == "eval"]
    evals_run = [r["txt_r1"] for r in read_jsonl(os.path.join(run_dir, "log.jsonl")) if r["kind"] == "eval"]
    assert evals_ref == evals_run and len(evals_ref) == 2
    a = torch.load(os.path.join(ref_dir, "checkpoint_last.pth"), weights_only=True)
    b = torch.load(os.path.join(run_dir, "checkpoint_last.pth"), weights_only=True)
    assert a["position"] == b["position"] == {"epoch": 2, "batch": 0, "global_step": 12}
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_torchrun_two_processes_on_cpu(tmp_path, blip_tokenizer):
    """Two ranks over gloo: DDP, sharded data, all-gathered queues, rank-0 logs and checkpoints."""
    cfg = micro_config(max_steps=3, eval_every_epochs=1, checkpoint_every=0)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out_dir = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "blip_fast.cli", "pretrain", "--config", str(path), "--output-dir", out_dir, "--device", "cpu"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    state = torch.load(os.path.join(out_dir, "checkpoint_last.pth"), weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["position"]["global_step"] == 3 and int(state["model"]["queue_ptr"]) == (3 * 2 * 4) % 16
    steps = [r for r in read_jsonl(os.path.join(out_dir, "log.jsonl")) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]


def test_cuda_graph_on_a_cpu_run_is_a_clear_error(tmp_path, blip_tokenizer):
    with pytest.raises(ValueError, match="cuda_graph: it needs a CUDA device.*cuda_graph=false"):
        run_pretrain(micro_config(max_steps=1, cuda_graph=True), str(tmp_path / "g"), device="cpu")


@pytest.mark.gpu
def test_gpu_graphed_steps_match_the_eager_steps(tmp_path, blip_tokenizer):
    """cuda_graph=true replays forward + backward: the same losses as eager steps (float32, no
    dropout differences: the model's dropout draws from the same generator in the same order), and
    capturing it changes nothing (its warm-up steps are undone)."""
    runs = {}
    for graph in (False, True):
        cfg = micro_config(max_steps=5, amp="none", num_workers=0, backend="reference", cuda_graph=graph)
        out = str(tmp_path / f"graph{graph}")
        runs[graph] = run_pretrain(cfg, out, device="cuda")
        runs[graph] = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "step"]
    for eager, graphed in zip(runs[False], runs[True]):
        for key in ("loss_ita", "loss_itm", "loss_lm"):
            assert graphed[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), (key, eager, graphed)
    assert len(runs[True]) == 5


@pytest.mark.gpu
def test_gpu_run_in_bf16_resumes_from_its_checkpoint(tmp_path, blip_tokenizer):
    out = str(tmp_path / "gpu")
    cfg = micro_config(max_steps=6, amp="bf16", num_workers=2, backend="auto", checkpoint_every=3)
    result = run_pretrain(cfg, out, device="cuda")
    steps = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if r["kind"] == "step"]
    assert result.global_step == 6 and not any(r["skipped"] for r in steps)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert "cuda" in state["rng"][0] and state["position"]["global_step"] == 6
    more = run_pretrain(micro_config(max_steps=8, amp="bf16", num_workers=2, backend="auto"), out, device="cuda",
                        resume="last")
    assert more.global_step == 8
