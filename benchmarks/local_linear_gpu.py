"""Local Linear Attention on one CUDA GPU: afterburner's Triton kernel against softmax attention, the op alone.

    python benchmarks/local_linear_gpu.py [--decode 1024 ... 32768] [--prefill 1024 4096] [--batches 1 8 64]
        [--lam 1.0] [--repeats 30] [--out FILE]

One layer of SmolLM2-135M's attention (9 query heads over 3 kv heads, head_dim 64; the trained LLA models
have this shape), bf16 paged cache in shuffled 16-token blocks. **Decode**: one query per sequence over L
keys; **prefill**: L causal queries over L keys (one sequence). Modes, side by side in one process:
    sdpa        torch SDPA over contiguous K/V (softmax at its best; no paging)
    triton lla  ``local_linear_paged_triton`` at ridge --lam (the trained models learned 0.9-1.2): online
                softmax statistics, matrix-free conjugate gradient (FlashLLA's defaults, up to 32
                iterations, each a pass over the keys), the weighted pass; fp32 arithmetic; one program
                per (query token, kv head)
    direct      decode only: ``local_linear_direct_batched`` over the same contiguous K/V as SDPA (Sigma
                formed per query head, one batched Cholesky solve; torch ops, fp32), eager and as a CUDA
                graph replay
    one-pass    decode only: ``local_linear_direct_triton``, the split-K kernel that gathers every sum in
                one pass over the paged K/V, then the torch merge and solve; eager and as a CUDA graph
Before timing, each output is checked against the float64 reference (``local_linear_reference``) on the
first sequence (prefill: its last 16 queries); a mismatch stops the run and nothing is written. Timing:
CUDA events, median of --repeats after warm-up, a 256 MiB buffer written before each call so K/V come from
device memory. Without CUDA it says so and exits with status 2. Writes benchmarks/results/local_linear_gpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
from afterburner.plugins.devtools.timing import cuda_graph, device_milliseconds

OUT = Path(__file__).resolve().parent / "results" / "local_linear_gpu.json"
HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 9, 3, 64, 16, torch.bfloat16
CHECKED_QUERIES = 16


def paged(batch: int, length: int, queries: int, gen: torch.Generator):
    device = gen.device  # cuda; cpu for a smoke run under TRITON_INTERPRET=1
    """(query [T, Hq, D], k_cache, v_cache, table, seq_lens, query_start, contiguous k, v [B, Hkv, L, D])."""
    n_blocks = length // BLOCK
    shape = (batch * n_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=device, generator=gen).to(DTYPE)
    v_cache = torch.randn(shape, device=device, generator=gen).to(DTYPE)
    table = torch.randperm(batch * n_blocks, device=device, generator=gen).int().view(batch, n_blocks)
    query = torch.randn(batch * queries, HEADS, HEAD_DIM, device=device, generator=gen).to(DTYPE)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    query_start = torch.arange(batch + 1, device=device, dtype=torch.int32) * queries
    keys = k_cache[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    values = v_cache[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    return query, k_cache, v_cache, table, seq_lens, query_start, keys, values


def sdpa(query, keys, values, batch: int, scale: float):
    """query [B * T, Hq, D] over [B, Hkv, L, D]; T > 1 is causal over the last T keys (here T = L)."""
    q = query.view(batch, -1, HEADS, HEAD_DIM).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=q.shape[2] > 1,
                                                           scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(query.shape)


def measure(kind: str, batch: int, length: int, *, lam: float, repeats: int, gen, flush) -> dict:
    device = gen.device.type
    from afterburner.attention_backends.local_linear.direct import local_linear_direct_batched
    from afterburner.attention_backends.local_linear.reference import local_linear_reference
    from afterburner.attention_backends.triton.local_linear import local_linear_paged_triton
    from afterburner.attention_backends.triton.local_linear_direct import local_linear_direct_triton

    queries = 1 if kind == "decode" else length
    query, k_cache, v_cache, table, seq_lens, query_start, keys, values = paged(batch, length, queries, gen)
    scale = HEAD_DIM ** -0.5

    def lla():
        return local_linear_paged_triton(query, k_cache, v_cache, table, seq_lens, query_start, scale=scale,
                                         lam=lam)

    def direct():
        return local_linear_direct_batched(query.view(batch, 1, HEADS, HEAD_DIM), keys.transpose(1, 2),
                                           values.transpose(1, 2), seq_lens, scale=scale, lam=lam).view(query.shape)

    checked = min(queries, CHECKED_QUERIES)
    expected = local_linear_reference(query[queries - checked:queries], keys[0].transpose(0, 1),
                                      values[0].transpose(0, 1), scale=scale, lam=lam)
    def one_pass():
        return local_linear_direct_triton(query, k_cache, v_cache, table, seq_lens, query_start, scale=scale,
                                          lam=lam)

    paths = {"local_linear": lla}
    if kind == "decode":
        paths.update(direct=direct, one_pass=one_pass)
    errors = {}
    for name, fn in paths.items():
        out = fn()[queries - checked:queries].double()
        errors[name] = ((out - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-12)).max().item()
        if not errors[name] < 2e-2:  # bf16 output rounding is a few 1e-3
            raise SystemExit(f"{name}, {kind} {length} x {batch}: relative error {errors[name]:.3g} against "
                             "the float64 reference; nothing written")
    row = {"kind": kind, "batch": batch, "tokens": length, "checked_relative_error": errors}
    row["sdpa_ms"] = device_milliseconds(lambda: sdpa(query, keys, values, batch, scale), repeats, device, flush)
    row["local_linear_ms"] = device_milliseconds(lla, repeats, device, flush)
    row["ratio"] = row["local_linear_ms"] / row["sdpa_ms"]
    if "direct" in paths:
        for name in ("direct", "one_pass"):
            row[f"{name}_ms"] = device_milliseconds(paths[name], repeats, device, flush)
            row[f"{name}_graph_ms"] = None
            if device == "cuda":
                try:
                    row[f"{name}_graph_ms"] = device_milliseconds(cuda_graph(paths[name]), repeats, device, flush)
                except Exception as exc:  # noqa: BLE001 - a capture refused (an op that syncs): keep the eager time
                    row[f"{name}_graph_error"] = str(exc).splitlines()[0]
            row[f"{name}_ratio"] = min(filter(None, (row[f"{name}_ms"], row[f"{name}_graph_ms"]))) / row["sdpa_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--prefill", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    add_allow_dirty_argument(parser)
    args = parser.parse_args(argv)
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("local_linear_gpu: no CUDA device here; this benchmark runs on a GPU only (nothing written)",
              file=sys.stderr)
        return 2
    if any(n % BLOCK for n in args.decode + args.prefill):
        parser.error(f"lengths must be multiples of the block size {BLOCK}")
    gen = torch.Generator(device=args.device).manual_seed(0)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=args.device) if args.device == "cuda" else None
    print(f"{torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"{'kind':>8} {'batch':>5} {'tokens':>7} {'lla ms':>9} {'sdpa ms':>9} {'ratio':>7} {'direct ms':>9} "
          f"{'graph ms':>9} {'ratio':>7} {'1-pass':>8} {'graph':>8} {'ratio':>7}")
    plan = [("decode", b, n) for b in args.batches for n in args.decode] + [("prefill", 1, n) for n in args.prefill]
    rows = []
    for kind, batch, length in plan:
        row = measure(kind, batch, length, lam=args.lam, repeats=args.repeats, gen=gen, flush=flush)
        rows.append(row)
        direct = ("" if "direct_ms" not in row else f" {row['direct_ms']:9.3f} "
                  f"{row['direct_graph_ms'] or float('nan'):9.3f} {row['direct_ratio']:6.1f}x "
                  f"{row['one_pass_ms']:8.3f} {row['one_pass_graph_ms'] or float('nan'):8.3f} "
                  f"{row['one_pass_ratio']:6.1f}x")
        print(f"{kind:>8} {batch:>5} {length:>7} {row['local_linear_ms']:9.3f} {row['sdpa_ms']:9.3f} "
              f"{row['ratio']:6.1f}x{direct}", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    shape = {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "dtype": "bfloat16"}
    out = write_result(args.out, {"shape": shape, "lam": args.lam, "repeats": args.repeats, "rows": rows},
                       command="python benchmarks/local_linear_gpu.py " + " ".join(sys.argv[1:]),
                       allow_dirty=args.allow_dirty)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
