"""``afterburner train hamburger``: a HAMburger-style micro-step drafter for a local base model, by
self-distillation on CPU (spec_decode/hamburger/train.py).

    afterburner train hamburger --base DIR --data FILE [FILE ...] --out DIR [--feature-layers 8,16,24,28]
        [--layers 1] [--micro-steps 4] [--seq-len 256] [--max-tokens N] [--epochs E | --steps N] [--lr LR]
        [--batch-size POSITIONS] [--stop-weight W] [--residual-init] [--seed S] [--threads T] [--resume]

Data as ``afterburner train medusa`` (.txt documents, .jsonl "text" or chat "messages"; chat trains on the
assistant turns). --out receives config.json + model.safetensors (the drafter only; the base's embedding
and LM head are read from --base at load time). Work files (the cached base pass with the feature layers'
hidden states, checkpoint.pt) live in OUT.train/ unless --work-dir says otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """Four layers spread over the base (a quarter, half, three quarters, and two before the end), as
    EAGLE-3 mixes low, middle and high features; SmolLM2's 30 layers give 8, 15, 23, 28."""
    picks = [math.ceil(num_layers * k / 4) for k in (1, 2, 3)] + [num_layers - 2]
    return tuple(sorted({i for i in picks if 1 <= i <= num_layers - 1} or {1}))


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids like 8,16,24,28, got {text!r}") from None


def add_parser(methods: argparse._SubParsersAction) -> None:
    p = methods.add_parser("hamburger", help="a micro-step drafter with a learned stop, by self-distillation",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_drafter_arguments(p, batch_help="positions per step (default 128)", batch_default=128)
    p.add_argument("--stop-weight", type=float, default=1.0, help="weight of the stop head's loss")
    p.set_defaults(run=run)


def add_drafter_arguments(p: argparse.ArgumentParser, *, batch_help: str, batch_default: int) -> None:
    """The arguments ``train hamburger`` and ``train eagle3`` share (same data, features and recipe)."""
    p.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face format)")
    p.add_argument("--data", required=True, nargs="+", type=Path, help=".txt or .jsonl files")
    p.add_argument("--out", required=True, type=Path, help="output drafter folder")
    p.add_argument("--feature-layers", type=_layers, default=None,
                   help="base hidden-state indices the drafter reads (HF output_hidden_states = vLLM "
                        "aux_hidden_state_layers; default: 4 spread over the base, 8,15,23,28 for 30 layers)")
    p.add_argument("--layers", type=int, default=1, choices=(1, 2), help="drafter decoder layers (default 1)")
    p.add_argument("--micro-steps", type=int, default=4, help="max tokens drafted per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most N tokens of data")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (may be fractional)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in all (overrides --epochs)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW; default 3e-3)")
    p.add_argument("--batch-size", type=int, default=batch_default, help=batch_help)
    p.add_argument("--residual-init", action="store_true",
                   help="start at the logit lens of the last feature layer (fc_in copies it, layers start as "
                        "the identity), as Medusa heads start at the identity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.05, help="share of data held out for the numbers")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--work-dir", type=Path, default=None, help="default: OUT.train")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint, if any")


def run(args: argparse.Namespace) -> int:
    from afterburner.plugins.cli.training import run_training
    from afterburner.spec_decode.hamburger.checkpoint import CheckpointError

    return run_training(_train, args, CheckpointError)


def _train(args: argparse.Namespace) -> int:
    import torch

    from afterburner.plugins import __version__
    from afterburner.spec_decode.hamburger.checkpoint import save_drafter
    from afterburner.spec_decode.hamburger.train import TrainConfig, base_norm_init, residual_init, train_drafter
    from afterburner.spec_decode.medusa import distill_data

    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         stop_weight=args.stop_weight, seed=args.seed, holdout=args.holdout,
                         save_every=args.save_every)
    work = args.work_dir or args.out.with_name(args.out.name + ".train")
    if not args.resume and (work / "checkpoint.pt").is_file():
        print(f"[afterburner] starting over ({work}/checkpoint.pt exists; --resume would continue it)")
    model, drafter_config, base, embed, lm_head = prepare(args, work)
    softcap = distill_data.logit_softcap(model)
    init = base_norm_init(model, drafter_config)
    if args.residual_init:
        init = residual_init(drafter_config, init, seed=args.seed)
    del model  # the drafter only needs the embedding and the lm_head from here on
    result = train_drafter(base, embed, lm_head, drafter_config=drafter_config, config=config, work_dir=work,
                           resume=args.resume, softcap=softcap, init=init)
    provenance = {
        "method": "self-distillation", "afterburner": __version__, "data": [str(p) for p in args.data],
        "data_key": base.key, "tokens": len(base.tokens), "train_positions": result.train_positions,
        "holdout_positions": result.holdout_positions, "steps": result.step, "seq_len": args.seq_len,
        "max_tokens": args.max_tokens, "config": config.__dict__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "train_seconds": round(result.seconds, 1),
        "init": "residual" if args.residual_init else "base norms", "argv": sys.argv[1:],
        "holdout": result.after, "holdout_untrained": result.before,
    }
    save_drafter(args.out, result.drafter, provenance=provenance)
    _summary(args, result, drafter_config, len(base.tokens), time.time() - started)
    return 0


def prepare(args: argparse.Namespace, work: Path):
    """What ``train hamburger`` and ``train eagle3`` start from: (the base model, the drafter config, the
    cached base pass with the feature layers, the base's embedding and LM head as float32 copies)."""
    from afterburner.spec_decode.hamburger.train import drafter_config_for
    from afterburner.spec_decode.medusa import distill_data

    model, tokenizer = distill_data.load_base(args.base)
    layers = args.feature_layers or default_feature_layers(model.config.num_hidden_layers)
    drafter_config = drafter_config_for(model.config, layers, num_layers=args.layers,
                                        max_micro_steps=args.micro_steps, base_model=str(args.base.resolve()))
    base, cached = distill_data.load_or_build(model, tokenizer, args.base, args.data, work / "base_pass.pt",
                                              seq_len=args.seq_len, max_tokens=args.max_tokens,
                                              feature_layers=layers)
    if cached:
        print(f"[afterburner] base pass: {len(base.tokens)} tokens from the cache in {work}")
    embed = model.get_input_embeddings().weight.detach().float().clone()
    lm_head = model.get_output_embeddings().weight.detach().float().clone()
    return model, drafter_config, base, embed, lm_head


def _summary(args, result, drafter_config, tokens: int, seconds: float) -> None:
    def fmt(values) -> str:
        return " ".join(f"{v:.3f}" for v in values) if values else "n/a"

    from afterburner.plugins.cli.training import summary_head

    before, after, nan = result.before, result.after, float("nan")
    layers = ",".join(map(str, drafter_config.feature_layers))
    lines = summary_head(f"[afterburner] hamburger drafter -> {args.out} (feature layers {layers})", result, tokens,
                         seconds, "loss (KL + stop BCE)")
    lines += [f"  held-out top-1 agreement with the base, micro-steps 1..{drafter_config.max_micro_steps}: "
              f"{fmt(after.get('top1'))} (untrained: {fmt(before.get('top1'))})",
              f"  mean run of agreeing micro-steps (accepted-length proxy, teacher-forced): "
              f"{after.get('accepted', nan):.2f} (untrained: {before.get('accepted', nan):.2f})",
              f"  stop head: BCE {after.get('stop_bce', nan):.3f}, accuracy {after.get('stop_accuracy', nan):.3f}, "
              f"ROC AUC {after.get('stop_auc') or nan:.3f}"]
    print("\n".join(lines), flush=True)
