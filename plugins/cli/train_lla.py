"""``afterburner train lla``: two tiny Llamas of one size from scratch on CPU, softmax and Local Linear
Attention, on the project's seeded synthetic tasks (MQAR, tokenized in-context linear regression), then a
held-out evaluation of both.

    afterburner train lla [--out DIR] [--attention softmax local_linear] [--tasks mqar regression]
        [--steps N] [--batch-size B] [--lr LR] [--hidden 128] [--layers 2] [--heads 2] [--kv-heads 2]
        [--intermediate 256] [--lambda 1.0] [--fixed-lambda] [--seed S] [--threads T] [--resume]
        [--stop-at STEP] [--eval-only] [--eval-instances N] [--results PATH]

OUT (default ``<cache>/models/lla-synthetic``) receives ``softmax/`` and ``local_linear/``: Hugging Face
folders (LlamaForCausalLM weights, config.json, a word-level tokenizer over the task vocabulary); the LLA
folder's config.json carries ``afterburner_local_linear_lambda`` (one float per layer), which the engine
adapters read. Checkpoints live in ``OUT/<attention>.train/checkpoint.pt``; ``--resume`` continues them
(same data, same learning rates). ``OUT/eval.json`` holds the evaluation; ``--results`` also writes it
with provenance (machine, versions, git commit) for benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EVAL_MQAR_PAIRS = (4, 8, 16, 24)  # trained on 4..16 by default; 24 is beyond the trained lengths
EVAL_REGRESSION_POINTS = (8, 16, 24, 32)  # trained on 8..24


def add_parser(methods: argparse._SubParsersAction) -> None:
    lla = methods.add_parser("lla", help="softmax vs local-linear tiny Llamas on MQAR and regression",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lla.add_argument("--out", type=Path, default=None, help="default: <cache>/models/lla-synthetic")
    lla.add_argument("--attention", nargs="+", default=["softmax", "local_linear"],
                     choices=["softmax", "local_linear"])
    lla.add_argument("--tasks", nargs="+", default=["mqar", "regression"], choices=["mqar", "regression"],
                     help="trained in turn, one task per step")
    lla.add_argument("--steps", type=int, default=1200)
    lla.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    lla.add_argument("--lr", type=float, default=3e-3)
    lla.add_argument("--hidden", type=int, default=128)
    lla.add_argument("--layers", type=int, default=2)
    lla.add_argument("--heads", type=int, default=2, help="query heads (head_dim = hidden / heads; the "
                     "vLLM CPU kernels want 64)")
    lla.add_argument("--kv-heads", type=int, default=2)
    lla.add_argument("--intermediate", type=int, default=256)
    lla.add_argument("--lambda", dest="lam", type=float, default=1.0, help="initial lambda of every LLA layer")
    lla.add_argument("--fixed-lambda", action="store_true", help="keep lambda fixed (default: learned per layer)")
    lla.add_argument("--seed", type=int, default=0)
    lla.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; on a "
                     "2-core machine busy with other jobs, 1 thread per run was several times faster than 2)")
    lla.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    lla.add_argument("--resume", action="store_true", help="continue from OUT/<attention>.train/checkpoint.pt")
    lla.add_argument("--stop-at", type=int, default=None, help="train only to this step of the --steps schedule "
                     "(export and evaluate a partial run; --resume continues it later)")
    lla.add_argument("--eval-only", action="store_true", help="evaluate the folders in OUT, train nothing")
    lla.add_argument("--eval-instances", type=int, default=512, help="held-out instances per task and size")
    lla.add_argument("--results", type=Path, default=None, help="also write the evaluation with provenance here")
    lla.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from afterburner.attention_backends.local_linear.training import CheckpointMismatch

    try:
        return _run(args)
    except (CheckpointMismatch, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (checkpoint saved; --resume continues)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    import torch

    from afterburner.attention_backends.local_linear.model import LlamaShape
    from afterburner.attention_backends.local_linear.tasks import VOCAB
    from afterburner.attention_backends.local_linear.training import TrainConfig, train
    from afterburner.plugins.cli import lla_export
    from afterburner.plugins.cli.models import model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or model_dir("lla-synthetic")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, tasks=tuple(args.tasks),
                         seed=args.seed, save_every=args.save_every)
    report: dict = {"train": {}, "eval": {}}
    for attention in args.attention:
        folder = out / attention
        if args.eval_only:
            model, info = lla_export.load_folder(folder)
        else:
            shape = LlamaShape(vocab_size=len(VOCAB), hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.layers, num_attention_heads=args.heads,
                               num_key_value_heads=args.kv_heads, attention=attention, lla_lambda=args.lam,
                               learn_lambda=not args.fixed_lambda)
            checkpoint = out / f"{attention}.train" / "checkpoint.pt"
            if not args.resume and checkpoint.is_file():
                print(f"[afterburner] starting over ({checkpoint} exists; --resume would continue it)")
            with _progress(attention, config.steps) as on_step:
                model, state = train(shape, config, checkpoint=checkpoint, resume=args.resume, on_step=on_step,
                                     stop_at=args.stop_at)
            info = _train_info(model, config, state)
            lla_export.save_folder(model, folder, training=info)
            print(f"[afterburner] {attention}: {info['parameters']} parameters, {state.step}/{config.steps} steps in "
                  f"{state.seconds:.0f} s, last-50 loss {info['final_loss']:.3f} -> {folder}", flush=True)
        report["train"][attention] = info
        started = time.perf_counter()
        report["eval"][attention] = _evaluate(model, args.eval_instances, args.seed)
        report["eval"][attention]["seconds"] = round(time.perf_counter() - started, 1)
    _print_table(report["eval"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.results is not None:
        from afterburner.plugins.devtools.provenance import write_result

        command = "afterburner train lla " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["train", "lla"] else [])
        print(f"[afterburner] wrote {write_result(args.results, report, command.strip())}")
    return 0


def _train_info(model, config, state) -> dict:
    from dataclasses import asdict

    last = state.losses[-50:]
    return {"parameters": sum(p.numel() for n, p in model.named_parameters() if not n.endswith("log_lambda")),
            "shape": asdict(model.shape), "config": asdict(config), "steps": state.step,
            "seconds": round(state.seconds, 1), "resumed_from": state.resumed_from,
            "final_loss": sum(last) / max(1, len(last)), "lambda": model.lambdas()}


def _evaluate(model, instances: int, seed: int) -> dict:
    from afterburner.attention_backends.local_linear.evaluate import evaluate_mqar, evaluate_regression

    return {"mqar": [evaluate_mqar(model, pairs=p, instances=instances, seed=seed) for p in EVAL_MQAR_PAIRS],
            "regression": [evaluate_regression(model, points=n, instances=instances, seed=seed)
                           for n in EVAL_REGRESSION_POINTS]}


def _print_table(evals: dict) -> None:
    names = list(evals)
    print("\nMQAR accuracy (held out)       " + "".join(f"{n:>14}" for n in names))
    for i, pairs in enumerate(EVAL_MQAR_PAIRS):
        row = "".join(f"{evals[n]['mqar'][i]['accuracy']:14.3f}" for n in names)
        print(f"  {pairs:3d} pairs (seq {1 + 4 * pairs:3d})          {row}")
    print("Regression MSE (held out)      " + "".join(f"{n:>14}" for n in names) + "  least-sq   zero")
    for i, points in enumerate(EVAL_REGRESSION_POINTS):
        first = evals[names[0]]["regression"][i]
        row = "".join(f"{evals[n]['regression'][i]['mse']:14.4f}" for n in names)
        print(f"  {points:3d} points (seq {1 + 2 * points:3d})         {row}  {first['ols_mse']:.4f}  "
              f"{first['zero_mse']:.4f}")


class _progress:
    """on_step(step, loss) for ``train``: a tqdm bar when tqdm is installed, else a line every 25 steps."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.bar, self.recent = name, total, None, []

    def __enter__(self):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.name, unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None
        return self.on_step

    def on_step(self, step: int, loss: float) -> None:
        self.recent = (self.recent + [loss])[-20:]
        mean = sum(self.recent) / len(self.recent)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{mean:.3f}", refresh=False)
            self.bar.refresh()
        elif step % 25 == 0 or step == self.total:
            print(f"[afterburner] {self.name} step {step}/{self.total} loss {mean:.3f}", flush=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
