"""``blip-fast pretrain`` and ``blip-fast eval``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .config import PretrainConfig, apply_overrides, read_yaml, resolve_config_path

DEFAULT_CONFIG = "pretrain_tiny"


def peek_job_config(path: str) -> Dict[str, Any]:
    """The config stored in a blip-fast pretrain checkpoint ({} for other checkpoints and URLs),
    read without loading the tensors (memory-mapped)."""
    if not os.path.isfile(path):
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        from ..checkpoint import read_checkpoint
        state = read_checkpoint(path)
    from .checkpointing import FORMAT
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return {}
    return dict(state.get("config") or {})
DEFAULT_OUTPUT = os.path.join("output", "pretrain")


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("blip_fast").setLevel(level)
    logging.getLogger("blip_fast.ops").setLevel(logging.WARNING)  # backend choices: see `blip-fast bench`


def _key_overrides(rest: Sequence[str], prog: str) -> List[str]:
    """``['--batch_size', '8', '--vit.depth=2']`` -> ``['batch_size=8', 'vit.depth=2']``."""
    out, i = [], 0
    rest = list(rest)
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or item == "--":
            raise SystemExit(f"{prog}: unexpected argument {item!r} (config keys go as --key value or --set key=value)")
        body = item[2:]
        if "=" in body:
            out.append(body)
            i += 1
        elif i + 1 < len(rest) and not (rest[i + 1].startswith("--") and len(rest[i + 1]) > 2):
            out.append(f"{body}={rest[i + 1]}")
            i += 2
        else:
            raise SystemExit(f"{prog}: --{body} needs a value (--{body} VALUE)")
    return out


def _config_keys_help() -> str:
    names = [f.name for f in PretrainConfig.__dataclass_fields__.values()]
    lines = ["config keys (set any with --KEY VALUE or --set KEY=VALUE; nested: --set vit.depth=4):"]
    line = " "
    for name in names:
        if len(line) + len(name) > 96:
            lines.append(line)
            line = " "
        line += " " + name
    lines.append(line)
    lines.append("shipped configs: pretrain (BLIP's pretrain.yaml), pretrain_tiny (the default: synthetic data, "
                 "CPU-sized)")
    return "\n".join(lines)


def pretrain_parser(prog: str = "blip-fast pretrain") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="BLIP pretraining (ITC + ITM + LM) from a YAML config, as BLIP's pretrain.py; "
                    "one process per device (torchrun --nproc_per_node N for several).",
        epilog=_config_keys_help())
    p.add_argument("--config", default=None,
                   help=f"YAML file or shipped config name (default: {DEFAULT_CONFIG}, or the checkpoint's own "
                        f"config when resuming)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=DEFAULT_OUTPUT,
                   help=f"checkpoints, log.jsonl, loss_curve.png, config.yaml (default: {DEFAULT_OUTPUT})")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--resume", nargs="?", const="last", default="",
                   help="continue a run: no value = OUTPUT_DIR/checkpoint_last.pth; 'auto' = that file if it "
                        "exists, else start fresh; or a checkpoint path")
    p.add_argument("--amp", choices=["none", "bf16"], default=None, help="bf16 autocast (float32 weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    return p


def resolve_pretrain_config(config: Optional[str], resume_path: Optional[str], overrides: Sequence[str]) -> Tuple[PretrainConfig, str]:
    """The run's config: ``--config`` (or the default), or the resumed checkpoint's, plus overrides."""
    if config is None and resume_path:
        values = peek_job_config(resume_path)
        where = f"config stored in {resume_path}"
    else:
        path = resolve_config_path(config or DEFAULT_CONFIG)
        values, where = read_yaml(path), path
    return PretrainConfig.from_dict(apply_overrides(values, overrides), where=where), where


def pretrain_main(argv: Optional[Sequence[str]] = None, prog: str = "blip-fast pretrain") -> int:
    parser = pretrain_parser(prog)
    args, rest = parser.parse_known_args(list(argv) if argv is not None else None)
    overrides = list(args.overrides) + _key_overrides(rest, prog)
    if args.amp is not None:
        overrides.append(f"amp={args.amp}")
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    from . import checkpointing
    from .job import NonFiniteLossError, run_pretrain
    try:
        resume_path = checkpointing.resolve_resume(args.resume, args.output_dir)
        cfg, where = resolve_pretrain_config(args.config, resume_path, overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"config: {where}" + (f" with {', '.join(overrides)}" if overrides else ""), flush=True)
    try:
        result = run_pretrain(cfg, args.output_dir, device=args.device,
                              resume=resume_path or "")
    except NonFiniteLossError as exc:
        print(f"{prog}: stopped: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0 if not result.stopped_by_signal else 130


# -- eval ---------------------------------------------------------------------------------------------
def eval_parser(prog: str = "blip-fast eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Zero-shot image-text retrieval (recall@1/5/10 both ways) with ITC ranking and ITM "
                               "re-ranking of the top k, as BLIP's train_retrieval.py evaluates.")
    p.add_argument("--checkpoint", required=True,
                   help="a blip-fast pretrain checkpoint or a BLIP checkpoint (path or URL) with the retrieval "
                        "modules (model_base.pth, model_base_retrieval_coco.pth, ...)")
    p.add_argument("--config", default=None, help="config for the model and data keys (default: the checkpoint's "
                                                  "own config, else BLIP base at --image-size)")
    p.add_argument("--ann-file", "--ann_file", dest="ann_file", default="",
                   help="BLIP-format JSON: [{\"image\": path, \"caption\": str or [str]}] (entries of one image merge)")
    p.add_argument("--image-root", "--image_root", dest="image_root", default=None, help="prefix for relative paths")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="evaluate on N scenes of the synthetic held-out split instead")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                   help="model input size (default: the config's; 384 for BLIP checkpoints)")
    p.add_argument("--vit", default=None, help="base or large, for BLIP checkpoints without a config")
    p.add_argument("--k-test", "--k_test", dest="k_test", type=int, default=None,
                   help="candidates re-ranked by ITM per query (default: the config's k_test)")
    p.add_argument("--no-itm", dest="itm", action="store_false", help="ITC ranking only")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--num-workers", dest="num_workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--output", default="", help="also write the metrics as JSON to this file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def build_eval_model(checkpoint: str, cfg: PretrainConfig, from_blip: bool):
    """BLIP_ITM (the retrieval modules only) with the checkpoint's weights loaded and checked."""
    from ..checkpoint import require_complete
    from ..models.blip import load_checkpoint
    from ..models.blip_itm import BLIP_ITM
    from ..models.med import load_med_config
    from ..tokenizer import BLIP_VOCAB_SIZE
    med = load_med_config(cfg.med_config if not from_blip else "med_config.json")
    med.vocab_size = max(med.vocab_size, BLIP_VOCAB_SIZE)
    model = BLIP_ITM(med_config=med, image_size=cfg.image_size, vit=cfg.vit, embed_dim=cfg.embed_dim)
    if cfg.backend and cfg.backend != "auto":
        model.set_backend(cfg.backend)
    logging.getLogger("blip_fast.checkpoint").setLevel(logging.WARNING)  # the report is summarised below
    model, report = load_checkpoint(model, checkpoint)
    require_complete(report, "retrieval evaluation")
    if report.unexpected_keys:
        print(f"loaded {checkpoint}; {len(report.unexpected_keys)} of its tensors are not part of the retrieval "
              f"modules (momentum encoders, queues, decoder, ...) and were left out", flush=True)
    return model


def eval_main(argv: Optional[Sequence[str]] = None, prog: str = "blip-fast eval") -> int:
    args = eval_parser(prog).parse_args(list(argv) if argv is not None else None)
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank)
    from ..evaluation.retrieval import evaluate_retrieval, format_metrics, retrieval_set_from_json, retrieval_set_synthetic
    from .runtime import init_runtime, shutdown

    try:
        if args.config:
            values: Dict[str, Any] = read_yaml(resolve_config_path(args.config))
            from_blip = False
        else:
            values = peek_job_config(args.checkpoint)
            from_blip = not values
            if from_blip:
                values = {"vit": "base", "image_size": 384, "med_config": "med_config.json", "dataset": "synthetic"}
        overrides = list(args.overrides)
        if args.image_size:
            overrides.append(f"image_size={args.image_size}")
        if args.vit:
            overrides.append(f"vit={args.vit}")
        cfg = PretrainConfig.from_dict(apply_overrides(values, overrides), where="eval config")
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    image_root = cfg.image_root if args.image_root is None else args.image_root
    if args.ann_file or (cfg.eval_file and not args.synthetic):
        rset = retrieval_set_from_json(args.ann_file or cfg.eval_file, image_root, cfg.image_size, cfg.max_words)
    elif args.synthetic or (cfg.dataset == "synthetic" and not from_blip):
        n = args.synthetic or int(cfg.synthetic.get("eval_size", 200))
        rset = retrieval_set_synthetic(n, cfg.image_size, cfg.seed, int(cfg.synthetic.get("max_objects", 2)))
    else:
        print(f"{prog}: give the evaluation data: --ann-file JSON (with --image-root) or --synthetic N", file=sys.stderr)
        return 2
    rt = init_runtime(args.device)
    try:
        model = build_eval_model(args.checkpoint, cfg, from_blip).to(rt.device)
        k_test = args.k_test or cfg.k_test
        metrics = evaluate_retrieval(model, rset, rt.device, k_test=k_test, amp=args.amp, batch_size=args.batch_size,
                                     num_workers=args.num_workers, rerank=args.itm)
    finally:
        shutdown(rt)
    if rt.is_main:
        metrics = {"checkpoint": args.checkpoint, "data": rset.name, **metrics}
        print(format_metrics(metrics))
        if "txt_r1" in metrics:
            print(format_metrics(metrics, itc_only=True))
        print(json.dumps(metrics, indent=1))
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=1)
    return 0
