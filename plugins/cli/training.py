"""What every self-distillation training command shares (``train medusa``, ``train hamburger``)."""

from __future__ import annotations

import argparse
import sys


def run_training(train, args: argparse.Namespace, *errors: type[Exception]) -> int:
    """A self-distillation training command: its data, training and ``errors`` are one ``error:`` line
    (exit 2); Ctrl-C says where it stopped (exit 130; ``--resume`` continues)."""
    from afterburner.spec_decode.medusa.distill_data import DataError
    from afterburner.spec_decode.medusa.train import TrainError

    try:
        return train(args)
    except (DataError, TrainError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\n{exc or 'interrupted'}", file=sys.stderr)
        return 130


def summary_head(title: str, result, tokens: int, seconds: float, loss_name: str) -> list[str]:
    """The first lines of a training command's summary: data, steps and time, the last training loss."""
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from is not None else ""
    lines = [title, f"  data: {tokens} tokens ({result.train_positions} training positions, "
                    f"{result.holdout_positions} held out)",
             f"  steps: {result.step}/{result.total_steps}{resumed}; total {seconds:.0f} s "
             f"(training {result.seconds:.0f} s)"]
    if result.losses:
        last = result.losses[-10:]
        lines.append(f"  train {loss_name}, mean of the last {len(last)} steps: {sum(last) / len(last):.3f}")
    return lines
