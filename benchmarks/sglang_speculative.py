"""afterburner's speculation through SGLang on CPU (``--attention-backend torch_native``, afterburner's verify
attention): Medusa with trained heads and the micro-step drafter (``make hamburger-drafter``, fixed length),
with and without a drafting vocabulary, and a draft model (SmolLM2's first 25 layers, through its KV cache),
against no speculation, one request at a time: what SGLang's CPU path gives a user today.

    python benchmarks/sglang_speculative.py [--heads DIR] [--drafter DIR] [--prompts 6] [--rounds 2] [--out FILE]

Run with the sglang venv's python (``scripts/venv.sh sglang``); SGLang on CPU needs sgl_kernel's CPU build,
for which the tests' shim stands in (``tests/sglang/shim``, put on the path here). Each setting runs in an
engine of its own, alone on the machine (started, warmed up with one short request, timed, shut down):
``speculative_vllm.py``'s first ``--prompts`` chat prompts, 96 greedy tokens each (``ignore_eos``), one
after another, ``--rounds`` times. Reported per setting: median seconds per round, tokens/s, the ratio to no
speculation, the token ids identical to no speculation, and SGLang's counters (verify steps, accepted
drafts). Writes benchmarks/results/sglang_speculative.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "sglang_speculative.json"
SHIM = ROOT / "tests" / "sglang" / "shim"
ENGINE = dict(device="cpu", attention_backend="torch_native", dtype="float32", max_total_tokens=8192,
              context_length=2048, random_seed=0, sleep_on_idle=True)
GREEDY = {"temperature": 0.0, "max_new_tokens": 96, "ignore_eos": True}
VOCAB = {"draft_vocab": 4096}  # heads / micro-steps score the folder's 4,096 most written tokens only
SETTINGS = {  # name: (algorithm, engine arguments beyond ENGINE, afterburner.speculative)
    "off": (None, {}, {}),
    "medusa chain 3": ("AFTERBURNER_MEDUSA", {"speculative_num_draft_tokens": 4}, {"tree": "chain"}),
    "medusa chain 3, vocab 4096": ("AFTERBURNER_MEDUSA", {"speculative_num_draft_tokens": 4},
                                   {"tree": "chain", **VOCAB}),
    "medusa tree 4": ("AFTERBURNER_MEDUSA", {"speculative_num_draft_tokens": 5}, {"tree": "paper"}),
    "medusa tree 4, vocab 4096": ("AFTERBURNER_MEDUSA", {"speculative_num_draft_tokens": 5},
                                  {"tree": "paper", **VOCAB}),
    "medusa tree 8": ("AFTERBURNER_MEDUSA", {"speculative_num_draft_tokens": 9}, {"tree": "paper"}),
    "micro-step chain 2, vocab 4096": ("AFTERBURNER_HAMBURGER", {"speculative_num_draft_tokens": 3},
                                       {"stop_threshold": 0.0, **VOCAB}),
    "draft l25 tree 4": ("AFTERBURNER_DRAFT", {"speculative_num_draft_tokens": 5}, {"tree": "paper"}),
    "draft l25 chain 2": ("AFTERBURNER_DRAFT", {"speculative_num_draft_tokens": 3}, {"tree": "chain"}),
}
DRAFT_LAYERS = 25


def prompts(model: Path, count: int) -> list[str]:
    """``speculative_vllm.py``'s first ``count`` prompts in the model's chat template."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speculative_vllm import TOPICS, user_prompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer.apply_chat_template([{"role": "user", "content": user_prompt(topic)}], tokenize=False,
                                          add_generation_prompt=True) for topic in TOPICS[:count]]


def one_setting(model: str, folders: dict, name: str, texts: list[str], rounds: int) -> dict:
    """In this process: one engine with setting ``name`` (``folders``: algorithm -> its draft folder), timed."""
    import sglang

    algorithm, extra, _ = SETTINGS[name]
    if algorithm is not None:
        extra = {**extra, "speculative_algorithm": algorithm, "speculative_draft_model_path": folders[algorithm]}
    engine = sglang.Engine(model_path=model, **ENGINE, **extra)
    try:
        engine.generate(texts[0], {**GREEDY, "max_new_tokens": 8})  # first-request costs, untimed
        seconds, outs = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            outs = [engine.generate(text, dict(GREEDY)) for text in texts]
            seconds.append(time.perf_counter() - started)
    finally:
        engine.shutdown()
    meta = [out["meta_info"] for out in outs]
    tokens = sum(m["completion_tokens"] for m in meta)
    median = statistics.median(seconds)
    steps = sum(m.get("spec_verify_ct", 0) for m in meta)
    accepted = sum(m.get("spec_num_correct_drafts", 0) for m in meta)
    return {"seconds": seconds, "median_s": median, "tokens": tokens, "tokens_per_s": tokens / median,
            "token_ids": [out["output_ids"] for out in outs], "verify_steps": steps, "accepted_drafts": accepted,
            "tokens_per_verify_step": (tokens / steps) if steps else None}


def main() -> None:
    from afterburner.plugins.cli.models import build_smollm2, trained_speculator
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.spec_decode.draft.derive import cached_layer_draft

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=Path, default=None, help="default: what make medusa-heads writes")
    parser.add_argument("--drafter", type=Path, default=None, help="default: what make hamburger-drafter writes")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process
    parser.add_argument("--out", type=Path, default=OUT)
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    heads = args.heads or trained_speculator("medusa")
    if heads is None or not (Path(heads) / "config.json").is_file():
        sys.exit("no Medusa heads: run `make medusa-heads` first (or pass --heads)")
    model = build_smollm2()
    folders = {"AFTERBURNER_MEDUSA": str(heads), "AFTERBURNER_DRAFT": str(cached_layer_draft(model, DRAFT_LAYERS))}
    drafter = args.drafter or trained_speculator("hamburger")
    if drafter is not None:
        folders["AFTERBURNER_HAMBURGER"] = str(drafter)
    elif any(SETTINGS[name][0] == "AFTERBURNER_HAMBURGER" for name in args.settings):
        sys.exit("no micro-step drafter: run `make hamburger-drafter` first (or pass --drafter)")
    texts = prompts(model, args.prompts)
    if args.one:
        print("RESULT " + json.dumps(one_setting(str(model), folders, args.one, texts, args.rounds)), flush=True)
        return
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    rows = {}
    for name in args.settings:
        print(f"[sglang speculative] {name} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH", "")) if p),
               "AFTERBURNER_CONFIG": json.dumps({"afterburner": {"speculative": SETTINGS[name][2]}})}
        run = subprocess.run([sys.executable, __file__, "--one", name, "--heads", str(heads), "--prompts",
                              str(args.prompts), "--rounds", str(args.rounds),
                              *(["--drafter", folders["AFTERBURNER_HAMBURGER"]] if drafter else [])],
                             env=env, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            sys.exit(f"{name}: exit status {run.returncode}\n{run.stderr[-3000:]}")
        rows[name] = json.loads(lines[-1][len("RESULT "):])
    off = rows.get("off")
    for name, row in rows.items():
        if off is not None:
            row["speedup"] = row["tokens_per_s"] / off["tokens_per_s"]
            row["identical_to_off"] = row["token_ids"] == off["token_ids"]
        print(f"{name}: {row['tokens_per_s']:.1f} tok/s ({row.get('speedup', float('nan')):.2f}x), "
              f"{row['tokens_per_verify_step']} tokens a verify step, identical {row.get('identical_to_off')}",
              flush=True)
    write_result(args.out, {"drafts": folders, "engine": ENGINE, "sampling": GREEDY, "prompts": texts,
                            "rounds": args.rounds, "rows": rows},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
