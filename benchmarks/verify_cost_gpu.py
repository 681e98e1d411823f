"""What a verification step costs on one GPU: a Llama forward of q new tokens over a cached context, q = 1
(plain decode) to 64 (a large token tree), and what the micro-step drafter costs beside it.

    python benchmarks/verify_cost_gpu.py [--models smollm2-135m llama-3-8b] [--tokens 1 2 3 4 5 8 16 32 64]
        [--batches 1 8] [--context 1024] [--repeats 30] [--out FILE] [--device cuda]

Speculative decoding pays when verifying q tokens costs much less than q plain steps: on the 2-core CPU a
carried token costs ~4 ms (SmolLM2, README), which is why Medusa and the micro-step drafter gain little
there. This measures the same curve where vLLM and SGLang are meant to run. The model is a plain-torch
Llama of the named shape with **random bf16 weights** (time does not depend on the values; no checkpoint
travels to the GPU machine): RMSNorm, fused QKV, RoPE, a static KV cache written at the new positions,
SDPA over the cache with a causal mask for the new rows (a tree mask costs the same), SiLU MLP, LM head
over every new position. Each (model, batch, q) is timed **eagerly and as a CUDA graph replay** (what
vLLM's decode runs), CUDA events, median of --repeats after warm-up. ``draft`` rows, timed the same two
ways: the micro-step drafter (``spec_decode/hamburger``, SmolLM2's trained drafter's shape) drafting 1 / 2 /
3 tokens and three Medusa heads (``spec_decode/medusa``), the cost a proposer adds to each step.
``--device cpu`` runs a tiny smoke version (no graphs; numbers not meaningful). Writes
benchmarks/results/verify_cost_gpu.json.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
from afterburner.plugins.devtools.timing import cuda_graph, device_milliseconds

OUT = Path(__file__).resolve().parent / "results" / "verify_cost_gpu.json"


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


SHAPES = {
    "smollm2-135m": Shape(576, 30, 9, 3, 64, 1536, 49152),
    "llama-3-8b": Shape(4096, 32, 32, 8, 128, 14336, 128256),
    "tiny": Shape(64, 2, 4, 2, 16, 128, 512),  # --device cpu smoke runs
}


class RandomLlama:
    """A Llama forward with a static KV cache of ``capacity`` positions, weights drawn at random."""

    def __init__(self, shape: Shape, batch: int, capacity: int, device: str, dtype: torch.dtype, gen):
        s = self.shape = shape

        def weight(*size):
            return (torch.randn(*size, device=device, generator=gen) * size[-1] ** -0.5).to(dtype)

        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.embed = weight(s.vocab, s.hidden)
        self.lm_head = weight(s.vocab, s.hidden)
        self.layers = [dict(qkv=weight(qkv, s.hidden), o=weight(s.hidden, s.heads * s.head_dim),
                            gate_up=weight(2 * s.intermediate, s.hidden), down=weight(s.hidden, s.intermediate))
                       for _ in range(s.layers)]
        cache = (batch, s.kv_heads, capacity, s.head_dim)
        self.k = [torch.randn(cache, device=device, generator=gen).to(dtype) for _ in range(s.layers)]
        self.v = [torch.randn(cache, device=device, generator=gen).to(dtype) for _ in range(s.layers)]
        inv = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        angles = torch.outer(torch.arange(capacity, device=device).float(), inv)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def _rope(self, x, start: int, q: int):
        cos, sin = self.cos[start:start + q, None], self.sin[start:start + q, None]  # [q, 1, D/2]
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def forward(self, tokens: torch.Tensor, context: int, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, q] at positions context .. context + q - 1 -> logits [B, q, V]; writes their K/V."""
        s, (batch, q) = self.shape, tokens.shape
        x = F.embedding(tokens, self.embed)
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,))
            qkv = (h @ w["qkv"].T).view(batch, q, s.heads + 2 * s.kv_heads, s.head_dim)
            queries, keys, values = qkv.split([s.heads, s.kv_heads, s.kv_heads], 2)
            queries, keys = self._rope(queries, context, q), self._rope(keys, context, q)
            self.k[i][:, :, context:context + q] = keys.transpose(1, 2)
            self.v[i][:, :, context:context + q] = values.transpose(1, 2)
            attn = F.scaled_dot_product_attention(queries.transpose(1, 2), self.k[i][:, :, :context + q],
                                                  self.v[i][:, :, :context + q], attn_mask=mask, enable_gqa=True)
            x = x + attn.transpose(1, 2).reshape(batch, q, -1) @ w["o"].T
            gate, up = (F.rms_norm(x, (s.hidden,)) @ w["gate_up"].T).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ w["down"].T
        return F.rms_norm(x, (s.hidden,)) @ self.lm_head.T


def eager_and_graph(fn, repeats: int, device: str) -> tuple[float, float | None]:
    """(eager ms, CUDA graph replay ms; None off CUDA) of ``fn``, which must not sync with the host."""
    with torch.inference_mode():
        eager = device_milliseconds(fn, repeats, device)
        if device != "cuda":
            return eager, None
        return eager, device_milliseconds(cuda_graph(fn), repeats, device)


def verify_rows(name: str, batch: int, args, gen) -> list[dict]:
    shape = SHAPES[name]
    model = RandomLlama(shape, batch, args.context + max(args.tokens), args.device, args.dtype, gen)
    rows = []
    for q in args.tokens:
        tokens = torch.randint(shape.vocab, (batch, q), device=args.device, generator=gen)
        keys = torch.arange(args.context + q, device=args.device)
        mask = keys[None, :] <= keys[args.context:, None]  # [q, context + q]: causal for the new rows

        eager, graph = eager_and_graph(lambda tokens=tokens, mask=mask: model.forward(tokens, args.context, mask),
                                       args.repeats, args.device)
        rows.append({"model": name, "batch": batch, "tokens": q, "context": args.context, "eager_ms": eager,
                     "graph_ms": graph})
    base = {"eager_ms": rows[0]["eager_ms"], "graph_ms": rows[0]["graph_ms"]}
    for row in rows:  # cost relative to this model's and batch's first q (1: a plain decode step)
        for key, first in base.items():
            row[key.replace("_ms", "_vs_first")] = None if first is None else row[key] / first
    return rows


def draft_rows(batch: int, args, gen) -> list[dict]:
    """The drafters' own cost per step, SmolLM2 shapes, random weights: the micro-step drafter's greedy chain
    of 1-3 tokens (``draft_topk`` column 0: the same micro-steps as ``draft`` at a fixed length, without its
    final host copy, so it can be captured) and three Medusa heads with their top-1 (shared LM head)."""
    from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
    from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads

    s = SHAPES["smollm2-135m"] if args.device == "cuda" else SHAPES["tiny"]
    config = DrafterConfig(base_hidden_size=s.hidden, vocab_size=s.vocab, feature_layers=(8, 16, 24, 28),
                           hidden_size=s.hidden, num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
                           intermediate_size=s.intermediate)
    drafter = MicroStepDrafter(config).to(device=args.device, dtype=args.dtype)
    embed = torch.randn(s.vocab, s.hidden, device=args.device, generator=gen).to(args.dtype)
    drafter.attach_base(embed, embed)
    features = torch.randn(batch, 4, s.hidden, device=args.device, generator=gen).to(args.dtype)
    last = torch.randint(s.vocab, (batch,), device=args.device, generator=gen)
    cases = {f"micro-step drafter, {n} drafts": lambda n=n: drafter.draft_topk(features, last, depth=n, topk=1)
             for n in (1, 2, 3)}
    medusa = MedusaHeads(HeadsConfig(hidden_size=s.hidden, vocab_size=s.vocab, num_heads=3, shared_lm_head=True))
    for block in medusa.blocks:  # trained heads are not the identity they start as
        for layer in block.layers:
            torch.nn.init.normal_(layer.weight, std=s.hidden ** -0.5)
    medusa = medusa.to(device=args.device, dtype=args.dtype)
    hidden = torch.randn(batch, s.hidden, device=args.device, generator=gen).to(args.dtype)
    cases["medusa, 3 heads"] = lambda: medusa(hidden, embed).argmax(-1)
    rows = []
    for name, fn in cases.items():
        eager, graph = eager_and_graph(fn, args.repeats, args.device)
        rows.append({"drafter": name, "batch": batch, "eager_ms": eager, "graph_ms": graph})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["smollm2-135m", "llama-3-8b"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8, 16, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=OUT)
    add_allow_dirty_argument(parser)
    args = parser.parse_args(argv)
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("verify_cost_gpu: no CUDA device here (nothing written); --device cpu runs a smoke version",
              file=sys.stderr)
        return 2
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator(device=args.device).manual_seed(0)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}, context {args.context}")
    print(f"{'model':>13} {'batch':>5} {'q':>3} {'eager ms':>9} {'graph ms':>9} {'graph vs q=1':>12}")
    verify = []
    for name in args.models:
        for batch in args.batches:
            rows = verify_rows(name, batch, args, gen)
            verify += rows
            for r in rows:
                graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:9.3f}"
                ratio = "-" if r["graph_vs_first"] is None else f"{r['graph_vs_first']:11.2f}x"
                print(f"{name:>13} {batch:>5} {r['tokens']:>3} {r['eager_ms']:9.3f} {graph:>9} {ratio:>12}",
                      flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    drafts = [row for batch in args.batches for row in draft_rows(batch, args, gen)]
    for r in drafts:
        graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.3f}"
        print(f"{r['drafter']}, batch {r['batch']}: {r['eager_ms']:.3f} ms eager, {graph} ms graph")
    out = write_result(args.out, {"context": args.context, "repeats": args.repeats, "dtype": str(args.dtype),
                                  "weights": "random (timing only)", "verify": verify, "draft": drafts},
                       command="python benchmarks/verify_cost_gpu.py " + " ".join(sys.argv[1:]),
                       allow_dirty=args.allow_dirty)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
