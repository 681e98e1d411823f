"""Greedy chain acceptance of Medusa heads on ``speculative_vllm.py``'s prompts, through plain torch: no
engine, so this measures the heads, not the speed.

    python benchmarks/medusa_acceptance.py --heads DIR [DIR ...] [--prompts 12] [--max-tokens 96]
        [--draft-vocab 4096] [--out FILE] [--allow-dirty]

Each prompt is decoded greedily for ``--max-tokens`` tokens past EOS (as the engine benchmark does with
``ignore_eos``); one causal pass gives every position's hidden state, and a chain of K drafts is replayed
along that text: at each step head k's top-1 (from the drafting vocabulary, as the engine rows draft) must be
the text's token k after the next one, the first miss ends the step, and the step emits one token more than
it accepted. That is what lossless greedy chain speculation accepts (the engine's counts agree to a few
hundredths). Reported per heads folder: tokens per step for chains of 1..K, each head's top-1 agreement,
before and after the first EOS, and the heads' own held-out numbers from training. Writes
benchmarks/results/medusa_acceptance.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "medusa_acceptance.json"


def greedy_text(model, ids, max_tokens: int):
    """prompt ids [L] + ``max_tokens`` greedy tokens (EOS does not stop it), with a KV cache."""
    import torch

    out = model(input_ids=ids[None], use_cache=True)
    generated = []
    for _ in range(max_tokens):
        token = out.logits[0, -1].argmax()
        generated.append(int(token))
        out = model(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return torch.cat([ids, torch.tensor(generated)])


def chain_steps(top, text, prompt_len: int, depth: int) -> list[tuple[int, int]]:
    """(first emitted position, tokens emitted) of each step of a greedy chain of ``depth`` drafts replayed
    along ``text``; top [K, T]: head k's top-1 from the hidden state at each position."""
    steps, c = [], prompt_len  # text[c] is the last committed token; the heads read the state at c - 1
    while c < len(text) - 1:
        n = 0
        while n < depth and c + n + 1 < len(text) and int(top[n, c - 1]) == int(text[c + n + 1]):
            n += 1
        steps.append((c, n + 1))
        c += n + 1
    return steps


def measure(model, tokenizer, heads_dir: Path, prompts: list[str], max_tokens: int, draft_vocab_size: int) -> dict:
    from afterburner.spec_decode import draft_vocab
    from afterburner.spec_decode.medusa.checkpoint import load_heads, load_shared_lm_head

    heads = load_heads(heads_dir)
    lm_head = load_shared_lm_head(heads_dir)
    lm_head = model.get_output_embeddings().weight if lm_head is None else lm_head
    keep = draft_vocab.load(heads_dir, draft_vocab_size, lm_head.shape[0]) if draft_vocab_size else None
    depth = heads.config.num_heads
    parts = {part: {"positions": 0, "head_hits": [0] * depth, "steps": [0] * depth, "tokens": [0] * depth}
             for part in ("before_eos", "after_eos")}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids[0]
        text = greedy_text(model, ids, max_tokens)
        hidden = model.base_model(input_ids=text[None]).last_hidden_state[0]
        logits = heads(hidden, lm_head)  # [K, T, V]
        top = keep[logits[:, :, keep].argmax(-1)] if keep is not None else logits.argmax(-1)
        generated = text[len(ids):].tolist()
        eos_at = len(ids) + (generated.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in generated
                             else len(generated))
        for p in range(len(ids) - 1, len(text) - 2):  # head k at p guesses text[p + 2 + k]
            part = parts["before_eos" if p + 1 < eos_at else "after_eos"]
            part["positions"] += 1
            for k in range(min(depth, len(text) - 2 - p)):
                part["head_hits"][k] += int(top[k, p] == text[p + 2 + k])
        for d in range(1, depth + 1):
            for first, emitted in chain_steps(top, text, len(ids), d):
                part = parts["before_eos" if first < eos_at else "after_eos"]
                part["steps"][d - 1] += 1
                part["tokens"][d - 1] += emitted
    summary = {}
    for name, part in parts.items():
        summary[name] = {"positions": part["positions"],
                         "head_top1": [h / max(part["positions"], 1) for h in part["head_hits"]],
                         "tokens_per_step_chain_of": {d + 1: part["tokens"][d] / max(part["steps"][d], 1)
                                                      for d in range(depth)}}
    steps = [parts["before_eos"]["steps"][d] + parts["after_eos"]["steps"][d] for d in range(depth)]
    tokens = [parts["before_eos"]["tokens"][d] + parts["after_eos"]["tokens"][d] for d in range(depth)]
    summary["all"] = {"tokens_per_step_chain_of": {d + 1: tokens[d] / steps[d] for d in range(depth)}}
    config = json.loads((heads_dir / "config.json").read_text())
    training = (config.get("afterburner") or {}).get("training") or {}
    kept = ("holdout_top1", "holdout_accepted", "holdout_positions", "tokens", "steps", "data")
    summary["training"] = {key: training[key] for key in kept if key in training}
    return summary


def main() -> None:
    import torch

    from afterburner.plugins.cli.models import build_smollm2
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.spec_decode.medusa.distill_data import load_base

    sys.path.insert(0, str(Path(__file__).parent))
    from speculative_vllm import TOPICS, user_prompt

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, nargs="+", required=True, help="Medusa heads folders")
    parser.add_argument("--prompts", type=int, default=len(TOPICS))
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--draft-vocab", type=int, default=4096, help="0: the whole vocabulary")
    parser.add_argument("--out", type=Path, default=OUT)
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    model, tokenizer = load_base(build_smollm2())
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": user_prompt(topic)}],
                                             tokenize=False, add_generation_prompt=True)
               for topic in TOPICS[: args.prompts]]
    results = {}
    with torch.inference_mode():
        for folder in args.heads:
            results[str(folder)] = measure(model, tokenizer, folder, prompts, args.max_tokens, args.draft_vocab)
            chains = results[str(folder)]["all"]["tokens_per_step_chain_of"]
            print(f"{folder}: tokens per step, chains of 1..K: " + " / ".join(f"{v:.3f}" for v in chains.values()))
    write_result(args.out, {"prompts": args.prompts, "max_tokens": args.max_tokens, "draft_vocab": args.draft_vocab,
                            "heads": results}, command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
