"""Greedy acceptance of a trained hamburger drafter on held-out prompts, through the plain torch reference
(spec_decode/hamburger/reference.py): no engine, so this measures the drafter, not the speed.

    python benchmarks/hamburger_acceptance.py [--drafter DIR] [--prompts 16] [--max-new-tokens 48]
        [--threads 1] [--allow-dirty]

Prompts: the corpus script's seeded pool (scripts/medusa_corpus.py ``make_prompts``) after the first
``--skip`` (160 by default: the ones ``make hamburger-drafter`` trained on), rendered with the chat template.
For each stop setting (fixed 4 drafts, the stop head at several thresholds, fixed 1-3 drafts) it reports per
base step (= one verification pass): drafted tokens, accepted drafts, emitted tokens (accepted + 1), and
checks every output is token-identical to plain greedy decoding (HF generate). Also lists the drafter's
held-out teacher-forced numbers from its training (config.json). Writes benchmarks/results/hamburger_train.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "hamburger_train.json"
SETTINGS = [  # (name, max drafts per step, stop threshold: None = never stop early)
    ("fixed k=1", 1, None), ("fixed k=2", 2, None), ("fixed k=4", 4, None), ("stop head, threshold 0.2", 4, 0.2),
    ("stop head, threshold 0.3", 4, 0.3), ("stop head, threshold 0.5", 4, 0.5), ("stop head, threshold 0.8", 4, 0.8),
]


def held_out_prompts(tokenizer, count: int, skip: int) -> list:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from medusa_corpus import make_prompts

    texts = make_prompts(skip + count, seed=0)[skip:]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True) for t in texts]
    return [torch.tensor(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rendered]


def main() -> None:
    import torch

    from afterburner.plugins.cli.models import build_smollm2, cache_root
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.spec_decode.hamburger.checkpoint import load_base_embeddings, load_drafter, read_config
    from afterburner.spec_decode.hamburger.reference import speculative_generate
    from afterburner.spec_decode.medusa.distill_data import load_base

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", type=Path, default=cache_root() / "hamburger" / "smollm2-drafter")
    parser.add_argument("--base", type=Path, default=None, help="default: SmolLM2-135M-Instruct (built)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--skip", type=int, default=160, help="prompts of the pool used for training")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, OUT, allow_dirty=args.allow_dirty)
    torch.set_num_threads(args.threads)
    base_dir = args.base or build_smollm2()
    model, tokenizer = load_base(base_dir)
    drafter = load_drafter(args.drafter).attach_base(*load_base_embeddings(base_dir))
    _, training = read_config(args.drafter)
    prompts = held_out_prompts(tokenizer, args.prompts, args.skip)
    eos = tokenizer.eos_token_id

    started = time.time()
    greedy = []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(prompt[None], max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
        greedy.append(out[0, prompt.numel():].tolist())
    rows = []
    for name, max_tokens, threshold in SETTINGS:
        drafted = accepted = steps = emitted = identical = 0
        t0 = time.time()
        for prompt, expected in zip(prompts, greedy, strict=True):
            tokens, lengths, drafts = _generate(speculative_generate, model, drafter, prompt, args.max_new_tokens,
                                                max_tokens, threshold, eos)
            identical += tokens == expected
            steps += len(lengths)
            accepted += sum(lengths)
            drafted += sum(drafts)
            emitted += sum(lengths) + len(lengths)
        row = {"setting": name, "max_drafts": max_tokens, "stop_threshold": threshold, "steps": steps,
               "drafted_per_step": drafted / steps, "accepted_per_step": accepted / steps,
               "emitted_per_step": emitted / steps, "acceptance_rate": accepted / max(drafted, 1),
               "identical_to_greedy": f"{identical}/{len(prompts)}", "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{name:28s} drafted/step {row['drafted_per_step']:.2f}  accepted/step {row['accepted_per_step']:.2f}"
              f"  emitted/step {row['emitted_per_step']:.2f}  rate {row['acceptance_rate']:.2f}"
              f"  identical {row['identical_to_greedy']}", flush=True)
    results = {"drafter": str(args.drafter), "base": str(base_dir), "prompts": len(prompts), "skip": args.skip,
               "max_new_tokens": args.max_new_tokens, "threads": args.threads,
               "seconds": round(time.time() - started, 1), "rows": rows,
               "drafter_config": drafter.config.to_dict(), "training": training,
               "note": "per step = per base-model verification pass after the first token (the prompt's own "
                       "pass emits one token without drafts); emitted = accepted + 1; plain torch reference, "
                       "full recompute per step, CPU"}
    write_result(OUT, results, command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {OUT}")


def _generate(speculative_generate, model, drafter, prompt, max_new_tokens, max_tokens, threshold, eos):
    """(tokens, accepted per step, drafted per step): the reference, with the drafter's draft lengths."""
    drafts: list[int] = []
    original = drafter.draft

    def counting_draft(*args, **kwargs):
        rows = original(*args, **kwargs)
        drafts.extend(len(r) for r in rows)
        return rows

    drafter.draft = counting_draft
    try:
        tokens, lengths = speculative_generate(model, drafter, prompt, max_new_tokens, max_tokens=max_tokens,
                                               stop_threshold=threshold, eos_token_id=eos)
    finally:
        del drafter.draft
    return tokens, lengths, drafts


if __name__ == "__main__":
    main()
