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
