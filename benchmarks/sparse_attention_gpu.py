"""Decode attention on one CUDA GPU: the Triton sparse paged kernel vs dense attention.

    python benchmarks/sparse_attention_gpu.py [--quick] [--contexts 4096 ... 131072] [--batches 1 8]

One layer of a Llama-3-8B-like model: 32 query heads, 8 kv heads, head_dim 128, bf16, 16-token blocks in
shuffled physical order, one decode query per sequence, every sequence the full context. Modes, side by
side in one process:
    sdpa dense     torch SDPA over contiguous K/V (no paging: dense at its best); a kv head's 4 query
                   heads go in as 4 query rows, so K/V are read once per kv head as in GQA kernels
    triton all     the sparse kernel with every block selected (same kernel, no selection)
    triton 1/4     the sparse kernel reading a quarter, then an eighth, of the blocks (attention only;
    triton 1/8     the blocks come from top-k over random scores with 1 sink and 2 recent blocks)
    quest 1/8      the whole selective step: Quest scoring kernel + batched top-k + the sparse kernel
    quest 1/8 graph  the same step captured as one CUDA graph (no launch gaps; how vLLM runs decode)
Timing: CUDA events around each call, median of --repeats after warm-up, a 256 MiB buffer written before
each call so K/V come from HBM (as in a real model, whose layers do not share L2). Events time the GPU,
so a mode of several launches also pays the gaps between them.
Before timing, each context's outputs are checked against torch on the GPU (dense SDPA; SDPA with the
selection as a mask); a mismatch stops the run and nothing is written. Without CUDA or Triton it says so
and exits with status 2, writing nothing: the numbers in the JSON always come from a GPU run.
--quick: contexts 4k, 32k, 128k and fewer repeats (about a minute on an H100, compile included).
Writes benchmarks/results/sparse_attention_gpu.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
from afterburner.plugins.devtools.timing import cuda_graph, gpu_milliseconds

OUT = Path(__file__).parent / "results" / "sparse_attention_gpu.json"
HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
GROUP = HEADS // KV_HEADS
SINKS, RECENTS = 1, 2


def make_context(batch: int, length: int, gen: torch.Generator):
    """Paged cache of `batch` sequences of `length` tokens in shuffled blocks, and their decode queries."""
    n_blocks = length // BLOCK
    shape = (batch * n_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
    table = torch.randperm(batch * n_blocks, device="cuda", generator=gen).int().view(batch, n_blocks)
    query = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, table, seq_lens


def contiguous_kv(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L, D]: the dense layout SDPA reads, gathered once, outside the timing."""
    return cache[table.long()].flatten(1, 2).transpose(1, 2).contiguous()


def sdpa_decode(query, keys, values, scale, mask=None):
    q = query.view(query.shape[0], KV_HEADS, GROUP, HEAD_DIM)  # GQA as query rows
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(query.shape)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest ||out - expected|| / ||expected|| over the [B, Hq] output rows."""
    diff = (out.float() - expected.float()).norm(dim=-1)
    return (diff / expected.float().norm(dim=-1).clamp_min(1e-12)).max().item()


def run_context(batch: int, length: int, repeats: int, gen: torch.Generator, flush: torch.Tensor) -> dict:
    from afterburner.attention_backends.triton.quest_scores import quest_block_scores
    from afterburner.attention_backends.triton.selection import indices_to_mask, topk_block_indices
    from afterburner.attention_backends.triton.sparse_decode import pick_num_splits, sparse_paged_decode

    query, k_cache, v_cache, table, seq_lens = make_context(batch, length, gen)
    keys, values = contiguous_kv(k_cache, table), contiguous_kv(v_cache, table)
    scale = HEAD_DIM ** -0.5
    n_blocks = table.shape[1]
    all_ids = torch.arange(n_blocks, device="cuda", dtype=torch.int32).repeat(batch, KV_HEADS, 1)
    random_scores = torch.rand(batch, KV_HEADS, n_blocks, device="cuda", generator=gen)
    kmin, kmax = k_cache.float().amin(1), k_cache.float().amax(1)  # every block is full here

    def ids_for(ratio):
        budget = math.ceil(ratio * n_blocks)
        return topk_block_indices(random_scores, seq_lens, BLOCK, budget=budget, sink_blocks=SINKS,
                                  recent_blocks=RECENTS)

    def quest_step():
        scores = quest_block_scores(query, kmin, kmax, table, seq_lens, block_size=BLOCK)
        ids = topk_block_indices(scores, seq_lens, BLOCK, budget=math.ceil(n_blocks / 8), sink_blocks=SINKS,
                                 recent_blocks=RECENTS)
        return sparse_paged_decode(query, k_cache, v_cache, table, seq_lens, ids, scale=scale)

    modes = {
        "sdpa dense": (lambda: sdpa_decode(query, keys, values, scale), None),
        "triton all": (lambda: sparse_paged_decode(query, k_cache, v_cache, table, seq_lens, all_ids,
                                                   scale=scale), all_ids),
    }
    for ratio, name in ((0.25, "triton 1/4"), (0.125, "triton 1/8")):
        ids = ids_for(ratio)
        modes[name] = (lambda ids=ids: sparse_paged_decode(query, k_cache, v_cache, table, seq_lens, ids,
                                                           scale=scale), ids)
    modes["quest 1/8"] = (quest_step, None)
    modes["quest 1/8 graph"] = (cuda_graph(quest_step), None)  # no launch gaps, as under vLLM's CUDA graphs

    # Correctness first, on this GPU: dense against SDPA, sparse against SDPA masked to the selection.
    dense = sdpa_decode(query, keys, values, scale)
    for name, (fn, ids) in modes.items():
        if ids is None:
            continue
        tokens = indices_to_mask(ids, n_blocks).repeat_interleave(BLOCK, -1)[:, :, None, :]  # [B, Hkv, 1, L]
        expected = dense if name == "triton all" else sdpa_decode(query, keys, values, scale, tokens)
        # Relative to each row's norm: long random contexts average to outputs near 0, where an absolute
        # tolerance would pass anything. bf16 rounding alone gives a few 1e-3.
        error = relative_error(fn(), expected)
        if not error < 2e-2:
            raise SystemExit(f"{name} at context {length}, batch {batch}: relative error {error:.3g} "
                             "vs torch; nothing written")

    row = {}
    block_bytes = BLOCK * HEAD_DIM * 2 * DTYPE.itemsize  # K and V of one block for one kv head
    for name, (fn, ids) in modes.items():
        selected = n_blocks * batch * KV_HEADS if ids is None else int((ids >= 0).sum())  # (b, kv, block)
        if name.startswith("quest"):
            selected = math.ceil(n_blocks / 8) * batch * KV_HEADS
        kv_bytes = selected * block_bytes
        ms = gpu_milliseconds(fn, repeats, flush)
        row[name] = {"ms": ms, "kv_bytes": kv_bytes, "kv_gb_per_s": kv_bytes / ms / 1e6}
    width = {name: ids.shape[-1] for name, (_, ids) in modes.items() if ids is not None}
    row["splits"] = {name: pick_num_splits(batch, KV_HEADS, w, BLOCK, query.device)
                     for name, w in width.items()}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="contexts 4k, 32k, 128k; 20 repeats")
    parser.add_argument("--out", type=Path, default=OUT)
    add_allow_dirty_argument(parser)
    args = parser.parse_args(argv)
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    if not torch.cuda.is_available():
        print("sparse_attention_gpu: no CUDA device here; this benchmark runs on a GPU only "
              "(nothing written)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("sparse_attention_gpu: Triton is not installed; nothing written", file=sys.stderr)
        return 2
    if args.quick:
        args.contexts, args.repeats = [4096, 32768, 131072], 20
    if any(length % BLOCK for length in args.contexts):
        parser.error(f"contexts must be multiples of the block size {BLOCK}")

    gen = torch.Generator(device="cuda").manual_seed(0)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    results = {}
    print(f"{torch.cuda.get_device_name(0)}, triton {triton.__version__}, torch {torch.__version__}")
    print(f"{'batch':>5} {'context':>8} {'mode':>11} {'ms':>8} {'KV GB/s':>8} {'vs sdpa':>8} {'vs all':>7}")
    for batch in args.batches:
        for length in args.contexts:
            row = run_context(batch, length, args.repeats, gen, flush)
            for name, cell in row.items():
                if name == "splits":
                    continue
                cell["speedup_vs_sdpa"] = row["sdpa dense"]["ms"] / cell["ms"]
                cell["speedup_vs_triton_all"] = row["triton all"]["ms"] / cell["ms"]
                print(f"{batch:>5} {length:>8} {name:>11} {cell['ms']:8.3f} {cell['kv_gb_per_s']:8.0f} "
                      f"{cell['speedup_vs_sdpa']:7.2f}x {cell['speedup_vs_triton_all']:6.2f}x", flush=True)
            results[f"batch {batch}, context {length}"] = row
            torch.cuda.empty_cache()
    shape = {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK,
             "dtype": "bfloat16", "sinks": SINKS, "recents": RECENTS, "repeats": args.repeats,
             "triton": triton.__version__}
    out = write_result(args.out, {"shape": shape, "by_config": results},
                       command="python benchmarks/sparse_attention_gpu.py " + " ".join(sys.argv[1:]),
                       allow_dirty=args.allow_dirty)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
