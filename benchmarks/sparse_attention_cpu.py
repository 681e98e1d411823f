"""Decode attention over a paged KV cache on this CPU, torch path: dense vs Quest-selected blocks.

    python benchmarks/sparse_attention_cpu.py [--lengths 4096 ... 131072] [--repeats 5]

One decode query per sequence, one layer with SmolLM2-135M's attention shape (9 query heads, 3 kv heads,
head_dim 64), float32, 32-token blocks in shuffled physical order. For each context length: the dense
torch path (every block, unmasked), the selective path with every block selected (the baseline of the
speedups: same code, no selection), and Quest selection at budgets 1/2, 1/4, 1/8 (scoring + top-k + the
selective op, all timed), with the KV bytes each reads. The keys are random, so this measures cost, not quality
(quality: the passkey eval). Median of ``--repeats`` runs, side by side in one process.
Writes benchmarks/results/sparse_attention_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from afterburner.attention_backends.selective import kv_bytes_read, selective_attention
from afterburner.attention_backends.sparse import quest
from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
from afterburner.plugins.devtools.timing import median_seconds

OUT = Path(__file__).parent / "results" / "sparse_attention_cpu.json"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 32


def run_length(length: int, repeats: int, gen: torch.Generator) -> dict:
    n_blocks = length // BLOCK
    k_cache = torch.randn(n_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    v_cache = torch.randn(n_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen)
    table = torch.randperm(n_blocks, generator=gen).int()[None]
    seq_lens, starts = torch.tensor([length]), torch.tensor([0, 1])
    query = torch.randn(1, HEADS, HEAD_DIM, generator=gen)
    kmin, kmax = quest.summaries_from_cache(k_cache, torch.full((n_blocks,), BLOCK))
    scale = HEAD_DIM ** -0.5

    def dense():
        return selective_attention(query, k_cache, v_cache, table, seq_lens, starts, scale=scale)

    row = {"dense": {"ms": 1000 * median_seconds(dense, repeats),
                     "kv_bytes": kv_bytes_read(seq_lens, None, BLOCK, HEAD_DIM, KV_HEADS, 4)}}
    for ratio in (1.0, 0.5, 0.25, 0.125):
        def sparse(ratio=ratio):
            scores = quest.block_scores(query, kmin, kmax, table[0])
            budget = quest.budget_blocks(length, BLOCK, budget_ratio=ratio, token_budget=None)
            mask = quest.select_blocks(scores, budget=budget, sink_blocks=1, recent_blocks=2)[None]
            return selective_attention(query, k_cache, v_cache, table, seq_lens, starts, scale=scale,
                                       block_mask=mask), mask

        _, mask = sparse()
        row["all blocks" if ratio == 1.0 else f"sparse 1/{round(1 / ratio)}"] = {
            "ms": 1000 * median_seconds(sparse, repeats),
            "kv_bytes": kv_bytes_read(seq_lens, mask, BLOCK, HEAD_DIM, KV_HEADS, 4),
        }
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--repeats", type=int, default=5)
    add_allow_dirty_argument(parser)
    args = parser.parse_args(argv)
    exit_if_refused(parser, OUT, allow_dirty=args.allow_dirty)
    gen = torch.Generator().manual_seed(0)
    results = {}
    print(f"{'context':>8} {'mode':>11} {'ms':>9} {'KV MB':>8} {'speedup':>8} {'KV read':>8}")
    for length in args.lengths:
        row = run_length(length, args.repeats, gen)
        # Speedups are against "all blocks": the same selective code path with every block selected, so
        # the ratio isolates what selection saves ("dense", the unmasked path, is shown for reference).
        base = row["all blocks"]
        for mode, cell in row.items():
            cell["speedup_vs_all_blocks"] = base["ms"] / cell["ms"]
            cell["kv_fraction"] = cell["kv_bytes"] / base["kv_bytes"]
            print(f"{length:>8} {mode:>11} {cell['ms']:9.2f} {cell['kv_bytes'] / 2**20:8.1f} "
                  f"{cell['speedup_vs_all_blocks']:7.2f}x {cell['kv_fraction']:7.1%}", flush=True)
        results[str(length)] = row
    out = write_result(OUT, {"shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                       "block_size": BLOCK, "dtype": "float32", "threads": torch.get_num_threads()},
                             "by_context": results},
                       command="python benchmarks/sparse_attention_cpu.py " + " ".join(sys.argv[1:]),
                       allow_dirty=args.allow_dirty)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
