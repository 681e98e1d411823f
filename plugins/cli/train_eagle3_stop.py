"""``afterburner train eagle3-stop``: a learned stop head on a trained EAGLE-3 drafter (spec_decode/eagle3/
stop_train.py), so vLLM's own EAGLE-3 drafts with the same weights as at a fixed ``k`` and the head picks each
request's draft length per step (``speculative.stop_head: true`` with ``stop_threshold``).

    afterburner train eagle3-stop --eagle3 DIR --base DIR --data FILE [FILE ...] [--work-dir DIR]
        [--draft-vocab N --ranking DIR] [--seq-len 256] [--max-tokens N] [--epochs 10] [--threads T]

Writes DIR/stop_head/ (with ``--draft-vocab N``: first the copy of DIR drafting from the N tokens --ranking's
draft_vocab.safetensors ranks first, DIR-vocabN, and the head in it: a head is fitted on the vocabulary it
drafts from). Give the data, --seq-len and --max-tokens ``train eagle3`` had, and its --work-dir, to reuse
the cached base pass; the held-out share and seed are the drafter's own (from its config.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parser(methods: argparse._SubParsersAction) -> None:
    p = methods.add_parser("eagle3-stop", help="a learned stop head on a trained EAGLE-3 drafter (vLLM's eagle3 "
                                               "with a draft length per request and step)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eagle3", required=True, type=Path, help="the EAGLE-3 folder (`afterburner train eagle3`)")
    p.add_argument("--base", required=True, type=Path, help="its base model folder (Hugging Face format)")
    p.add_argument("--data", required=True, nargs="+", type=Path, help="the drafter's corpus (.txt or .jsonl)")
    p.add_argument("--work-dir", type=Path, default=None, help="where the base pass is cached (default: "
                                                                  "EAGLE3.train, as train eagle3's)")
    p.add_argument("--draft-vocab", type=int, default=None, help="fit the head on a copy drafting from N tokens")
    p.add_argument("--ranking", type=Path, default=None, help="with --draft-vocab: the folder whose "
                                                                "draft_vocab.safetensors ranks the tokens")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per chunk (default 256, train eagle3's)")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most N tokens of data")
    p.add_argument("--epochs", type=int, default=10, help="passes over the drafter's outputs (default 10)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (AdamW; default 2e-3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from afterburner.plugins.cli.training import run_training
    from afterburner.spec_decode.draft_vocab import DraftVocabError
    from afterburner.spec_decode.eagle3.folder import Eagle3FolderError

    if (args.draft_vocab is None) != (args.ranking is None):
        print("error: --draft-vocab and --ranking go together", file=sys.stderr)
        return 2
    return run_training(_train, args, Eagle3FolderError, DraftVocabError)


def _train(args: argparse.Namespace) -> int:
    import torch

    from afterburner.plugins import __version__
    from afterburner.spec_decode.eagle3.folder import draft_vocab_copy, load_eagle3, save_stop_head
    from afterburner.spec_decode.eagle3.stop_train import StopTrainConfig, train_stop_head
    from afterburner.spec_decode.medusa import distill_data

    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = distill_data.load_base(args.base)
    embed = model.get_input_embeddings().weight.detach().float().clone()
    lm_head = model.get_output_embeddings().weight.detach().float().clone()
    folder = args.eagle3 if args.draft_vocab is None else \
        draft_vocab_copy(args.eagle3, args.ranking, args.draft_vocab, lm_head)
    drafter, vocab_ids = load_eagle3(folder)  # a drafting copy holds the same drafter weights
    c = drafter.config
    work = args.work_dir or args.eagle3.with_name(args.eagle3.name + ".train")
    base, cached = distill_data.load_or_build(model, tokenizer, args.base, args.data, work / "base_pass.pt",
                                              seq_len=args.seq_len, max_tokens=args.max_tokens,
                                              feature_layers=c.feature_layers)
    if cached:
        print(f"[afterburner] base pass: {len(base.tokens)} tokens from the cache in {work}")
    softcap = distill_data.logit_softcap(model)
    del model
    trained = (json.loads((args.eagle3 / "config.json").read_text())["afterburner_eagle3"].get("training")
               or {}).get("config") or {}
    config = StopTrainConfig(epochs=args.epochs, lr=args.lr, seed=int(trained.get("seed", 0)),
                             holdout=float(trained.get("holdout", 0.05)))
    result = train_stop_head(drafter.attach_base(embed, lm_head), base, lm_head, config=config,
                             vocab_ids=vocab_ids, softcap=softcap)
    held = result.holdout
    provenance = {"method": "BCE on the frozen drafter's teacher-forced drafts", "afterburner": __version__,
                  "data": [str(p) for p in args.data], "data_key": base.key, "config": config.__dict__,
                  "draft_vocab_size": None if vocab_ids is None else len(vocab_ids),
                  "train_examples": result.train_examples, "holdout": held, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "train_seconds": round(result.seconds, 1),
                  "argv": sys.argv[1:]}
    save_stop_head(folder, result.head, provenance=provenance)
    nan = float("nan")
    print(f"[afterburner] stop head -> {folder}/stop_head ({result.train_examples} training drafts, "
          f"{result.holdout_examples} held out; {time.time() - started:.0f} s)\n"
          f"  held-out ROC AUC for 'accepted': head {held.get('head_auc') or nan:.3f}, draft probability "
          f"{held.get('confidence_auc') or nan:.3f} (positive rate {held.get('label_rate', nan):.3f})", flush=True)
    return 0
