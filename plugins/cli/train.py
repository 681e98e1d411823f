"""``afterburner train medusa``: Medusa heads for a local base model, by self-distillation on CPU.

    afterburner train medusa --base DIR --data FILE [FILE ...] --out DIR [--heads 3] [--layers 1]
        [--shared-lm-head | --own-lm-head] [--seq-len 256] [--max-tokens N] [--epochs E] [--lr LR]
        [--batch-size POSITIONS] [--seed S] [--resume]

Data: .txt files (one document each) or .jsonl (a "text" field, or chat "messages" rendered with the
base tokenizer's chat template). The folder --out is what vLLM loads with
``--speculative-config '{"method": "medusa", "model": OUT, "num_speculative_tokens": K}'``.
Work files (the cached base pass, checkpoint.pt) live in OUT.train/ unless --work-dir says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train Medusa heads or a hamburger drafter for a local model, "
                           "or the tiny LLA/softmax models (CPU)")
    methods = train.add_subparsers(dest="method", required=True)
    medusa = methods.add_parser("medusa", help="Medusa heads by self-distillation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    medusa.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face format)")
    medusa.add_argument("--data", required=True, nargs="+", type=Path, help=".txt or .jsonl files")
    medusa.add_argument("--out", required=True, type=Path, help="output folder (vLLM Medusa format)")
    medusa.add_argument("--heads", type=int, default=3, help="number of heads K (default 3)")
    medusa.add_argument("--layers", type=int, default=1, help="residual layers per head (default 1)")
    lm_head = medusa.add_mutually_exclusive_group()
    lm_head.add_argument("--shared-lm-head", dest="shared_lm_head", action="store_true", default=True,
                         help="heads reuse the base lm_head (default: few weights, fast on CPU)")
    lm_head.add_argument("--own-lm-head", dest="shared_lm_head", action="store_false",
                         help="each head trains its own lm_head, initialised from the base one")
    medusa.add_argument("--seq-len", type=int, default=256, help="tokens per chunk (default 256)")
    medusa.add_argument("--max-tokens", type=int, default=None, help="use at most N tokens of data")
    medusa.add_argument("--epochs", type=float, default=1.0, help="passes over the data (may be fractional)")
    medusa.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW; default 3e-3)")
    medusa.add_argument("--batch-size", type=int, default=256, help="positions per step (default 256)")
    medusa.add_argument("--seed", type=int, default=0)
    medusa.add_argument("--holdout", type=float, default=0.05, help="share of data held out for agreement")
    medusa.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default 50)")
    medusa.add_argument("--work-dir", type=Path, default=None, help="default: OUT.train")
    medusa.add_argument("--resume", action="store_true", help="continue from the last checkpoint, if any")
    medusa.set_defaults(run=run)
    from afterburner.plugins.cli import train_draft_vocab, train_eagle3, train_eagle3_stop, train_hamburger, train_lla

    train_lla.add_parser(methods)
    train_hamburger.add_parser(methods)
    train_eagle3.add_parser(methods)
    train_eagle3_stop.add_parser(methods)
    train_draft_vocab.add_parser(methods)


def run(args: argparse.Namespace) -> int:
    from afterburner.plugins.cli.training import run_training
    from afterburner.spec_decode.medusa.checkpoint import CheckpointError

    return run_training(_train_medusa, args, CheckpointError)


def _train_medusa(args: argparse.Namespace) -> int:
    import torch

    from afterburner.plugins import __version__
    from afterburner.spec_decode.medusa import distill_data
    from afterburner.spec_decode.medusa.checkpoint import save_heads
    from afterburner.spec_decode.medusa.train import TrainConfig, train_heads

    started = time.time()
    config = TrainConfig(num_heads=args.heads, num_layers=args.layers, shared_lm_head=args.shared_lm_head,
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         holdout=args.holdout, save_every=args.save_every)
    work = args.work_dir or args.out.with_name(args.out.name + ".train")
    if not args.resume and (work / "checkpoint.pt").is_file():
        print(f"[afterburner] starting over ({work}/checkpoint.pt exists; --resume would continue it)")
    model, tokenizer = distill_data.load_base(args.base)
    base, cached = distill_data.load_or_build(model, tokenizer, args.base, args.data, work / "base_pass.pt",
                                              seq_len=args.seq_len, max_tokens=args.max_tokens)
    if cached:
        print(f"[afterburner] base pass: {len(base.tokens)} tokens from the cache in {work}")
    lm_head = model.get_output_embeddings().weight.detach().float().clone()
    softcap = distill_data.logit_softcap(model)
    del model  # the heads only need the lm_head from here on
    result = train_heads(base, lm_head, config=config, work_dir=work, resume=args.resume, softcap=softcap)
    provenance = {
        "method": "self-distillation", "afterburner": __version__, "data": [str(p) for p in args.data],
        "data_key": base.key, "tokens": len(base.tokens), "train_positions": result.train_positions,
        "holdout_positions": result.holdout_positions, "steps": result.step, "seq_len": args.seq_len,
        "max_tokens": args.max_tokens, "config": config.__dict__, "torch": torch.__version__,
        "holdout_top1": result.after.get("top1"), "holdout_top1_untrained": result.before.get("top1"),
        "holdout_accepted": result.after.get("accepted"),
        "holdout_tree": result.after.get("tree"),  # rank prefixes and counts: speculative.tree "measured"
    }
    save_heads(result.heads, args.out, base_model=args.base.resolve(), lm_head_weight=lm_head,
               provenance=provenance)
    _summary(args, result, len(base.tokens), time.time() - started)
    return 0


def _summary(args, result, tokens: int, seconds: float) -> None:
    def per_head(values) -> str:
        return " ".join(f"{v:.3f}" for v in values) if values else "n/a"

    from afterburner.plugins.cli.training import summary_head

    before, after, nan = result.before, result.after, float("nan")
    spec = json.dumps({"method": "medusa", "model": str(args.out.resolve()),
                       "num_speculative_tokens": args.heads})
    lines = summary_head(f"[afterburner] Medusa heads -> {args.out}", result, tokens, seconds, "KL")
    lines += [f"  held-out top-1 agreement with the base model, heads 1..{args.heads}: "
              f"{per_head(after.get('top1'))} (untrained: {per_head(before.get('top1'))})",
              f"  held-out KL per head: {per_head(after.get('kl'))} "
              f"(untrained: {per_head(before.get('kl'))})",
              f"  mean run of agreeing heads from head 1 (accepted-draft proxy): "
              f"{after.get('accepted', nan):.2f} (untrained: {before.get('accepted', nan):.2f})",
              f"  vLLM: --speculative-config '{spec}'"]
    print("\n".join(lines), flush=True)
