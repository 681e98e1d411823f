"""``afterburner models draft``: a draft model derived from a local target folder, and its measured greedy
agreement with the target (see ``afterburner.spec_decode.draft.derive``).

    afterburner models draft --from DIR (--layers N | --int4 [--group-size G]) --out DIR [--no-agreement]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(models: argparse.ArgumentParser) -> None:
    group = models.add_argument_group("draft", "with the name `draft`: derive a draft from a target folder")
    group.add_argument("--from", dest="draft_from", type=Path, help="target model folder (Hugging Face Llama)")
    kind = group.add_mutually_exclusive_group()
    kind.add_argument("--layers", type=int, help="keep the first N decoder layers (+ final norm and LM head)")
    kind.add_argument("--int4", action="store_true", help="fake-quantise decoder linear weights to int4")
    group.add_argument("--group-size", type=int, default=None,
                       help="input channels per int4 scale (default: derive.INT4_GROUP_SIZE, 32)")
    group.add_argument("--out", type=Path, help="draft folder to write")
    group.add_argument("--no-agreement", action="store_true", help="skip measuring greedy agreement")


def run(args: argparse.Namespace) -> int:
    from afterburner.spec_decode.draft.derive import INT4_GROUP_SIZE, derive_draft, greedy_agreement

    if args.draft_from is None or args.out is None or (args.layers is None and not args.int4):
        print("error: models draft needs --from DIR, --out DIR and one of --layers N / --int4", file=sys.stderr)
        return 2
    if not (args.draft_from / "config.json").is_file():
        print(f"error: --from {args.draft_from}: no config.json (not a Hugging Face model folder)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        out = derive_draft(args.draft_from, args.out, layers=args.layers, int4=args.int4,
                           group_size=args.group_size or INT4_GROUP_SIZE)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[afterburner] draft written in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if not args.no_agreement:
        started = time.perf_counter()
        agreement = greedy_agreement(args.draft_from, out)
        print(f"greedy agreement with the target: {agreement:.3f} "
              f"(teacher-forced top-1 on 4 prompts x 32 tokens, {time.perf_counter() - started:.0f} s)")
    print(out)
    return 0
