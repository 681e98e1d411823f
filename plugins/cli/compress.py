"""``afterburner compress``: SpecPC prompt compression of a text file with a draft model (CPU, transformers).

    afterburner compress --draft DIR --capacity C FILE [--ids] [--out PATH] [--lookahead N] [--start-layer L]

Prints (or writes to --out) the compressed prompt: its text, or with ``--ids`` a JSON list of token ids
(exact: decoded text may tokenize differently). A progress line goes to stderr. The target must share the
draft's tokenizer (drafts from ``afterburner models draft`` do).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    # defaults (None) are SpecPCSettings' (the paper code's): kept out of here so that the CLI imports no torch
    compress = sub.add_parser("compress", help="SpecPC: compress a prompt file with a draft model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compress.add_argument("file", type=Path, help="text file: the prompt")
    compress.add_argument("--draft", required=True, type=Path, help="draft model folder")
    compress.add_argument("--capacity", required=True, type=int, help="prompt tokens to keep (C)")
    compress.add_argument("--lookahead", type=int, help="tokens the draft writes (default 1)")
    compress.add_argument("--start-layer", type=int, help="first draft layer scored (default 8)")
    compress.add_argument("--window", type=int, help="last prompt queries scored and tokens kept (default 64)")
    compress.add_argument("--kernel", type=int, help="max-pool kernel (default 64)")
    compress.add_argument("--neighbours", type=int, help="span kept around each top token (default 64)")
    compress.add_argument("--ids", action="store_true", help="print token ids (JSON) instead of text")
    compress.add_argument("--out", type=Path, help="write here instead of stdout")
    compress.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from afterburner.spec_decode.draft.specpc import SpecPCSettings
    from afterburner.spec_decode.draft.specpc_draft import compress_ids, load_draft

    if not args.file.is_file():
        print(f"error: no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        given = {name: getattr(args, name) for name in ("window", "kernel", "neighbours", "start_layer", "lookahead")}
        settings = SpecPCSettings(capacity=args.capacity, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    draft = load_draft(args.draft)
    prompt_ids = draft.tokenizer(args.file.read_text()).input_ids
    print(f"[afterburner] compress: drafting over {len(prompt_ids)} prompt tokens "
          f"(look-ahead {settings.lookahead}) ...", file=sys.stderr, flush=True)
    result = compress_ids(draft, prompt_ids, settings)
    print(f"[afterburner] compress: kept {len(result.kept)} of {result.prompt_len} tokens "
          f"({len(result.kept) / max(result.prompt_len, 1):.0%}), draft {result.draft_seconds:.1f} s",
          file=sys.stderr, flush=True)
    text = json.dumps(result.token_ids) if args.ids else draft.tokenizer.decode(result.token_ids)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0
