"""What Local Linear Attention does to a model trained with softmax: SmolLM2-135M's perplexity on local text
with every layer's attention replaced by afterburner's local-linear op, against lambda.

    python benchmarks/local_linear_perplexity.py [--lams 1e6 100 10 1 0.1] [--windows 8] [--tokens 256]
        [--threads 2] [--allow-dirty]

The model is frozen (no training under LLA): this measures how far LLA at a given ridge strength is from the
softmax attention the weights were trained with. As lambda grows LLA tends to softmax attention, so a large
lambda should give softmax's perplexity; small lambdas change every layer's output. Text: the project's
local prose (sentences from the Python standard library's docstrings, ``plugins/lm_eval/text.py``), joined in
their fixed order and cut into ``--windows`` windows of ``--tokens`` tokens; each window is scored as one
causal forward (transformers, float32), mean negative log-likelihood of its tokens after the first.
Attention goes through ``local_linear_blockwise`` (FlashLLA's defaults: up to 32 CG iterations, no
preconditioner). Writes benchmarks/results/local_linear_perplexity.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class LocalLinearSwitch:
    """The registered attention function: softmax (SDPA) while ``lam`` is None, else local-linear."""

    def __init__(self):
        self.lam: float | None = None

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from afterburner.attention_backends.local_linear.blockwise import local_linear_blockwise

        if self.lam is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        # [B=1, H, T, D] -> the op's [T, H, D]; causal over the window (queries are its T positions)
        out = local_linear_blockwise(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                     scale=scaling, lam=self.lam)
        return out[None], None  # transformers expects [B, T, H, D]


def windows(tokenizer, count: int, tokens: int) -> list[torch.Tensor]:
    from afterburner.plugins.lm_eval.text import local_sentences

    ids = tokenizer(" ".join(local_sentences()), return_tensors="pt").input_ids[0]
    if ids.shape[0] < count * tokens:
        raise SystemExit(f"only {ids.shape[0]} tokens of local text: ask fewer windows or tokens")
    stride = ids.shape[0] // count
    return [ids[i * stride: i * stride + tokens] for i in range(count)]


def main() -> int:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from afterburner.plugins.cli.models import build_smollm2
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lams", type=float, nargs="+", default=[1e6, 100.0, 10.0, 1.0, 0.1])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "local_linear_perplexity.json")
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    torch.set_num_threads(args.threads)
    switch = LocalLinearSwitch()
    AttentionInterface.register("afterburner_lla_switch", switch.attention)
    path = build_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="afterburner_lla_switch",
                                                 dtype=torch.float32).eval()
    texts = windows(tokenizer, args.windows, args.tokens)
    rows, started = [], time.time()
    for lam in [None, *args.lams]:
        switch.lam = lam
        nll, count, began = 0.0, 0, time.time()
        with torch.inference_mode():
            for ids in texts:
                logits = model(ids[None]).logits[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
                count += ids.shape[0] - 1
        row = {"attention": "softmax (SDPA)" if lam is None else "local-linear", "lam": lam,
               "perplexity": math.exp(nll / count), "tokens_scored": count, "seconds": time.time() - began}
        rows.append(row)
        print(f"[lla-ppl] {row['attention']} lam={lam}: perplexity {row['perplexity']:.2f} "
              f"({row['seconds']:.0f} s; {time.time() - started:.0f} s so far)", file=sys.stderr, flush=True)
    write_result(args.out, {"model": "SmolLM2-135M-Instruct", "windows": args.windows, "tokens": args.tokens,
                            "threads": args.threads, "rows": rows},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"[lla-ppl] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
