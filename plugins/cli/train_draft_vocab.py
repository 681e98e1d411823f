"""``afterburner train draft-vocab``: rank the tokens a target writes in a corpus, for drafting from the most
frequent only (``spec_decode/draft_vocab.py``; ``speculative.draft_vocab`` = N then uses the first N).

    afterburner train draft-vocab --base DIR --data FILE [FILE ...] --out HEADS_OR_DRAFTER_DIR

Writes OUT/draft_vocab.safetensors and prints how much of held-out documents' tokens the first N cover.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(methods: argparse._SubParsersAction) -> None:
    p = methods.add_parser("draft-vocab", help="rank the tokens the target writes, for a drafter's vocabulary",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="base model folder (its tokenizer)")
    p.add_argument("--data", required=True, nargs="+", type=Path, help="the drafter's corpus (.txt or .jsonl)")
    p.add_argument("--out", required=True, type=Path, help="the heads' or drafter's folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from afterburner.spec_decode import draft_vocab
    from afterburner.spec_decode.medusa.distill_data import DataError, read_documents

    if not args.out.is_dir():
        print(f"afterburner train draft-vocab: --out {args.out} is not a folder (train the heads or drafter first)")
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.base)
        written = draft_vocab.written_tokens(read_documents(args.data, tokenizer), tokenizer)
    except (DataError, OSError, ValueError) as exc:
        print(f"afterburner train draft-vocab: {exc}")
        return 2
    vocab_size = len(tokenizer)
    ranked = draft_vocab.rank_tokens(written, vocab_size)
    path = draft_vocab.save(args.out, ranked)
    seen = len({token for tokens in written for token in tokens})
    print(f"[afterburner] {path}: {vocab_size} tokens ranked, {seen} of them written in "
          f"{sum(map(len, written))} tokens of {len(written)} documents")
    # coverage on documents the ranking did not see: every 10th document held out
    held_out = written[::10]
    ranked_rest = draft_vocab.rank_tokens([w for i, w in enumerate(written) if i % 10], vocab_size)
    for size in (1024, 2048, 4096, 8192):
        if size < vocab_size:
            print(f"  first {size:5d}: cover {draft_vocab.coverage(ranked_rest, held_out, size):.3f} of the tokens "
                  "of held-out documents (every 10th, ranked without them)")
    return 0
