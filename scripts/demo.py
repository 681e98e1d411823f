"""`make demo`: vLLM with afterburner next to stock vLLM, on SmolLM2-135M, on this machine.

Starts two real `vllm serve` processes side by side (afterburner loaded; afterburner filtered out with
VLLM_PLUGINS=""), sends the same requests to both, prints the answers side by side, then what afterburner
registered and did in each engine process. Each feature issue adds its own section:
- constrained sampling: one request constrained by a JSON schema through AWRS (``vllm_xargs``), with the
  number of constraint checks it took, next to the same request unconstrained.
- selective attention: servers with ``attention.method: "sparse"`` (1/4 budget, whole 32-token blocks) and
  ``"squeezed"`` (in kernel blocks, the best 1/4 of the context's cluster-ordered blocks) answer a ~1,750-token
  passkey prompt next to dense attention: the answers and the share of the context's KV that their decode steps
  read.
- SpecPC: the dense afterburner server has a draft (SmolLM2's first 25 layers, derived once in seconds)
  and answers three passkey prompts whole and compressed per request to C = 512 tokens
  (``vllm_xargs specpc_capacity``): the answers, how many found the key, the prompt tokens read and the
  time to the first token (a one-token request) with and without compression, the draft's scoring included.
- Medusa: a fourth server with ``--speculative-config`` answers a chat request next to the same server
  without speculation: the same text, in fewer engine steps. It uses the heads ``make medusa-heads`` trains
  if they exist, drafting a chain of 3 (the shape that paid most on this CPU), else untrained "echo" heads
  built in seconds with afterburner's tree of 16 nodes (each head repeats the base model's next-token
  guess: lossless, but few drafts are accepted).
- Micro-step drafter (HAMburger-style): when ``make hamburger-drafter`` has trained one, a server with
  ``"method": "hamburger"`` answers the same chat request: same text, fewer base-model steps, the draft
  lengths its stop head chose (vLLM's counters); else the demo says how to build it.
- Local-linear attention: a model trained with it (``make lla-models``; else the demo trains a quick one
  on its first run, ~4-5 minutes on 2 cores) served with
  ``attention.method: "local_linear"`` answers held-out recall queries (multi-query associative recall):
  its answers, the true values, and whether each served answer is the training code's own model's.

Servers start one after another (each waits for the previous one to answer /health), in two phases (the
stock and selective servers stop before the speculative and local-linear ones start: at most four hold
memory at once), and each runs in its own process group, which is ended on every exit path: success,
error, Ctrl-C, SIGTERM, and (through a watchdog per server) this process being killed outright.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from afterburner.plugins import report
from afterburner.plugins.cli.models import build_smollm2, cache_root, model_dir, trained_speculator
from afterburner.plugins.devtools.vllm_server import VllmServer, spec_steps
from afterburner.plugins.lm_eval.dataset import TASKS_DIR, read_jsonl
from afterburner.plugins.lm_eval.generators import passkey_prompt

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache_root() / "vllm")}.items():
    os.environ.setdefault(key, value)

CONFIG = {"afterburner": {"attention": {"method": "dense"}}}
SPECPC_CAPACITY = 512
SPECPC_DRAFT_LAYERS = 25
SPARSE_CONFIG = {"afterburner": {"attention": {"method": "sparse", "sparse": {"budget_ratio": 0.25,
                                                                             "dense_below_tokens": 512}}}}
SQUEEZED_CONFIG = {"afterburner": {"attention": {"method": "squeezed", "squeezed": {"budget_ratio": 0.25,
                                                                                 "dense_below_tokens": 512}}}}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                           "population_millions": {"type": "number"}},
          "required": ["city", "population_millions"], "additionalProperties": False}
MEDUSA_TREE_NODES = 16
SPECULATION_REQUEST = {"messages": [{"role": "user", "content": "Explain how a rainbow forms, in a few sentences."}],
                  "max_tokens": 80}
ROUNDS = 3  # timed requests per side: one request's time is noise at a few seconds
# The speculation sections' servers (off: the dense afterburner one; on) give the model every core: vLLM-CPU
# otherwise keeps one for its scheduler, which on 2 cores leaves the model one (benchmarks/medusa_serve.py)
ALL_CORES = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
CONSTRAINED_PROMPT = "Give the largest city of France and its population as JSON:"
HAMBURGER_DRAFT = 4
# The drafter's stop head is trained on ~21% positive labels: its default 0.8 drafts almost nothing, 0.3 is
# where it accepted most per step in benchmarks/results/hamburger_vllm.json.
HAMBURGER_CONFIG = {"afterburner": {"speculative": {"stop_threshold": 0.3}}}
PHASE_TWO = ("medusa", "hamburger", "local_linear")
LLA_CONFIG = {"afterburner": {"attention": {"method": "local_linear"}}}
LLA_QUERIES, LLA_PAIRS = 8, 4  # one query per held-out instance of 4 key-value pairs (trained on 4-16)
REQUESTS = [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12}),
    ("/v1/completions", {"prompt": "def fibonacci(n):", "max_tokens": 24}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three primary colors."}],
                              "max_tokens": 24}),
]


def _text(body: dict) -> str:
    choice = body["choices"][0]
    return (choice.get("text") or choice.get("message", {}).get("content") or "").strip()


def _ask(server: VllmServer, path: str, body: dict) -> tuple[str, float]:
    started = time.perf_counter()
    reply = server.post(path, {**body, "temperature": 0})
    return _text(reply), time.perf_counter() - started


def _print_report(report_dir: Path) -> None:
    events = report.read_dir(report_dir)
    print("\nWhat afterburner registered and did, per engine process:")
    for pid in sorted({e["pid"] for e in events}):
        mine = [e for e in events if e["pid"] == pid]
        print(f"  pid {pid} ({mine[0]['process']}):")
        for event in mine:
            if event["event"] == "registered":
                registered = ", ".join(event["registered"])
                print(f"    registered on vLLM {event['version']} ({event['status']}): {registered}")
            elif event["event"] == "config":
                print(f"    config seen at {event['where']}: {json.dumps(event['config'])}")
            elif event["event"] == "awrs":
                print(f"    AWRS request ({event['kind']}): {event['tokens']} tokens, {event['checks']} checks")
            elif event["event"] == "specpc_request":
                print(f"    SpecPC request: kept {event['kept_tokens']} of {event['prompt_tokens']} prompt tokens "
                      f"(draft {event['draft_seconds']:.1f} s)")
            else:
                print(f"    {event['event']}: {event.get('reason', '')}")


def _constrained_section(servers: dict[str, VllmServer], report_dir: Path) -> bool:
    print("\nConstrained sampling (AWRS), JSON schema:", json.dumps(SCHEMA))
    body = {"prompt": CONSTRAINED_PROMPT, "max_tokens": 60, "temperature": 0,
            "vllm_xargs": {"awrs_json_schema": json.dumps(SCHEMA)}}
    text, seconds = _ask(servers["afterburner"], "/v1/completions", body)
    plain, _ = _ask(servers["afterburner"], "/v1/completions", {"prompt": CONSTRAINED_PROMPT, "max_tokens": 60})
    print(f"  unconstrained: {plain!r}")
    print(f"  with AWRS ({seconds:4.1f} s): {text!r}")
    try:
        value = json.loads(text)
        valid = set(value) == set(SCHEMA["required"])
    except ValueError:
        valid = False
    awrs = [e for e in report.read_dir(report_dir) if e["event"] == "awrs"]
    if awrs:
        event = awrs[-1]
        print(f"  valid JSON for the schema: {valid}; {event['checks']} constraint checks for {event['tokens']} "
              f"tokens ({event['checks'] / max(1, event['tokens']):.1f} per token; token masking would check "
              f"49,152 per token)")
    return valid


def _sparse_section(servers: dict[str, VllmServer], work: Path) -> None:
    doc = _passkey_doc()
    body = {"prompt": passkey_prompt(doc["context"]), "max_tokens": 12}
    print(f"\nSelective attention: passkey prompt of ~{len(body['prompt']) // 4} tokens, key {doc['passkey']}")
    for name, label in (("afterburner", "dense"), ("sparse", "sparse 1/4"), ("squeezed", "squeezed 1/4")):
        text, seconds = _ask(servers[name], "/v1/completions", body)
        print(f"  {label:>13} ({seconds:4.1f} s): {text!r}  {'found' if doc['passkey'] in text else 'missed'}")
    # Each server's last cumulative event (its engine's totals): what the selective decode steps read.
    last = {name: events[-1] for name in ("sparse", "squeezed")
            if (events := [e for e in report.read_dir(work / f"{name}-report") if e["event"] == f"{name}_attention"])}
    if "sparse" in last:
        stats = last["sparse"]
        read, dense = stats["kv_bytes_read"] / 2**20, stats["kv_bytes_dense"] / 2**20
        print(f"  sparse decode rows read {read:,.0f} of {dense:,.0f} "
              f"MiB of KV ({stats['kv_bytes_read'] / max(1, stats['kv_bytes_dense']):.0%}, through vLLM's kernel) "
              f"plus {stats['summary_bytes_read'] / 2**20:,.0f} MiB of page summaries, over "
              f"{stats['forward_calls']} layer calls")
    if "squeezed" in last:
        stats = last["squeezed"]
        print(f"  squeezed decode steps read {stats['tokens_read'] / max(1, stats['tokens_in_context']):.0%} of the "
              f"context's keys ({stats['indexes_built']} layer indexes built) over {stats['forward_calls']} "
              "layer calls")


def _passkey_doc(index: int = 0) -> dict:
    return read_jsonl(TASKS_DIR / "afterburner_passkey" / "afterburner_passkey_2048.jsonl")[index]


def specpc_draft(model: Path) -> Path:
    """SmolLM2's first 25 layers as a SpecPC draft (``afterburner models draft``; seconds, once)."""
    draft = cache_root() / "drafts" / f"{model.name}-l{SPECPC_DRAFT_LAYERS}"
    if not (draft / "config.json").is_file():
        from afterburner.spec_decode.draft.derive import derive_draft

        print(f"[demo] deriving the SpecPC draft {draft} ...", flush=True)
        derive_draft(model, draft, layers=SPECPC_DRAFT_LAYERS)
    return draft


def _specpc_section(server: VllmServer, docs: tuple[int, ...] = (1, 2, 3)) -> None:
    """SpecPC is lossy: whole and compressed answers are printed side by side for a few documents, with how
    many each found; they are not required to match."""
    print(f"\nSpecPC prompt compression (draft: SmolLM2's first {SPECPC_DRAFT_LAYERS} of 30 layers), passkey prompts "
          f"of ~2,000 tokens, whole and compressed to C = {SPECPC_CAPACITY} (`vllm_xargs specpc_capacity`):")
    found = {"whole": 0, "specpc": 0}
    same = 0
    for index in docs:  # prompts no server has cached yet
        doc = _passkey_doc(index)
        body = {"prompt": passkey_prompt(doc["context"]), "temperature": 0}
        print(f"  document {index}, key {doc['passkey']}:")
        answers, first_token = {}, {}
        for label, extra in (("whole", {}), ("specpc", {"vllm_xargs": {"specpc_capacity": SPECPC_CAPACITY}})):
            started = time.perf_counter()
            first = server.post("/v1/completions", {**body, **extra, "max_tokens": 1})
            first_token[label] = to_first = time.perf_counter() - started
            answers[label] = text = _text(server.post("/v1/completions", {**body, **extra, "max_tokens": 12}))
            found[label] += doc["passkey"] in text
            print(f"    {label:>6}: {text!r}  {'found' if doc['passkey'] in text else 'missed'}; engine read "
                  f"{first['usage']['prompt_tokens']} prompt tokens; first token after {to_first:.1f} s")
        same += answers["whole"] == answers["specpc"]
    print(f"  found: whole prompt {found['whole']} / {len(docs)}, SpecPC {found['specpc']} / {len(docs)}; same answer "
          f"{same} / {len(docs)}. SpecPC's first token includes its draft reading the whole prompt with transformers "
          "in the API server. A handful of documents: README (SpecPC) has 12 per length.")


def medusa_heads(model: Path) -> tuple[Path, str, int, dict]:
    """(folder, what they are, drafted tokens, afterburner's speculative settings): the trained SmolLM2 heads
    if ``make medusa-heads`` ran, drafting the shape that paid most on this 2-core CPU (a chain of 3 from the
    4,096 most written tokens: ``tree_plan`` in benchmarks/results/medusa_vllm_rounds.json, 1.13x there), else
    echo heads (seconds to build) with the paper's tree of 16 nodes."""
    trained = trained_speculator("medusa")
    if trained is not None:
        return (trained, "trained by make medusa-heads; a chain of 3 drafts from 4,096 tokens", 3,
                {"tree": "chain", "draft_vocab": 4096})
    echo = cache_root() / "medusa" / "smollm2-echo-heads"
    if not (echo / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from afterburner.spec_decode.medusa.checkpoint import save_heads
        from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads

        base = AutoModelForCausalLM.from_pretrained(model)
        heads = MedusaHeads(HeadsConfig(base.config.hidden_size, base.config.vocab_size, num_heads=3,
                                        shared_lm_head=True))
        save_heads(heads, echo, base_model=model, lm_head_weight=base.lm_head.weight)
    return (echo, f"untrained echo heads, a tree of {MEDUSA_TREE_NODES} nodes; run `make medusa-heads` for trained "
            "ones", MEDUSA_TREE_NODES, {"tree": "paper"})


def _speculation_section(servers: dict[str, VllmServer], name: str, title: str) -> bool:
    """The chat request with speculation off (the dense afterburner server) and on (``name``), ``ROUNDS``
    times each, alternating, after an untimed warm-up of the speculative server (its first request pays
    one-time costs): the texts, the median seconds, and from vLLM's own counters the base-model steps taken
    and the drafts carried."""
    print(f"\n{title}:")
    _ask(servers[name], "/v1/chat/completions", {**SPECULATION_REQUEST, "max_tokens": 8})
    before = servers[name].spec_counters()
    runs: dict[str, list[tuple[str, float]]] = {"off": [], "on": []}
    for _ in range(ROUNDS):
        for label, server in (("off", "afterburner"), ("on", name)):
            runs[label].append(_ask(servers[server], "/v1/chat/completions", SPECULATION_REQUEST))
    done = spec_steps(before, servers[name].spec_counters())
    steps, drafted, accepted = done["verification_steps"], done["drafted"], done["accepted"]
    seconds = {label: statistics.median(s for _, s in answers) for label, answers in runs.items()}
    for label, answers in runs.items():
        print(f"  {label:>11} ({seconds[label]:4.1f} s, median of {ROUNDS}): {answers[0][0]!r}")
    same = all(text == runs["off"][0][0] for answers in runs.values() for text, _ in answers)
    if steps:
        print(f"  same text: {same}; over the {ROUNDS} requests with speculation {steps} verification steps "
              f"carried {drafted} draft tokens ({drafted / steps:.2f} per step) and emitted {steps + accepted} "
              f"tokens ({done['tokens_per_verification_step']:.2f} per step; one per step without); time on / "
              f"off {seconds['on'] / seconds['off']:.2f} (one request at a time)")
    return same


def lla_model() -> Path:
    """The local-linear model ``make lla-models`` trains (6,000 steps), else a quick 1,200-step one trained
    here on first use (its own folder, so ``make lla-models`` can still resume its checkpoints)."""
    trained = model_dir("lla-synthetic") / "local_linear"
    if (trained / "config.json").is_file():
        return trained
    quick = model_dir("lla-synthetic-quick")
    if not (quick / "local_linear" / "config.json").is_file():
        from afterburner.plugins.cli import main as cli

        print("[demo] training a quick local-linear model once (`afterburner train lla --attention local_linear "
              "--steps 1200`, about 4-5 minutes on 2 cores; `make lla-models` trains the better one)", flush=True)
        if cli(["train", "lla", "--attention", "local_linear", "--steps", "1200", "--eval-instances", "64",
                "--out", str(quick)]) != 0:
            raise RuntimeError("afterburner train lla failed")
    return quick / "local_linear"


def _lla_section(server: VllmServer, folder: Path) -> bool:
    import torch

    from afterburner.attention_backends.local_linear.evaluate import heldout_batch
    from afterburner.attention_backends.local_linear.tasks import VOCAB, describe
    from afterburner.plugins.cli.lla_export import load_folder

    model, record = load_folder(folder)
    batch = heldout_batch("mqar", size=LLA_PAIRS, instances=LLA_QUERIES, seed=7)
    query = 1 + 2 * LLA_PAIRS  # the first query key of each instance
    with torch.no_grad():
        trained = model(batch.tokens[:, :query + 1])[:, -1].argmax(-1)
    print(f"\nLocal-linear attention: a model trained with it ({record['steps']} steps, learned lambdas "
          f"{', '.join(f'{lam:.2f}' for lam in record['lambda'])}), served by vLLM with afterburner, recalls "
          f"the value of a key among {LLA_PAIRS} pairs:")
    right = same = 0
    for row in range(LLA_QUERIES):
        prompt = describe(batch.tokens[row, 1:query + 1])
        answer, _ = _ask(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        truth, own = VOCAB[int(batch.tokens[row, query + 1])], VOCAB[int(trained[row])]
        right, same = right + (answer == truth), same + (answer == own)
        print(f"  {prompt:<40} -> {answer:<4} (true {truth}; {'right' if answer == truth else 'wrong'})")
    print(f"  {right}/{LLA_QUERIES} right; {same}/{LLA_QUERIES} served answers equal the training code's model "
          "(README: accuracy on 512 held-out queries per length through lm-eval, against softmax)")
    return same == LLA_QUERIES


def main() -> int:
    model = build_smollm2()
    lla = lla_model()
    drafter = trained_speculator("hamburger")  # `make hamburger-drafter` (~25 minutes here), if it ran
    heads, heads_note, heads_drafts, heads_settings = medusa_heads(model)
    config = {"afterburner": {**CONFIG["afterburner"], "specpc": {"draft": str(specpc_draft(model))}}}
    work = Path(tempfile.mkdtemp(prefix="afterburner-demo-"))
    report_dir = work / "report"
    servers = {
        "afterburner": VllmServer(model, "--additional-config", json.dumps(config), log=work / "afterburner.log",
                                  env={report.REPORT_DIR_ENV: str(report_dir), **ALL_CORES}, max_model_len=2048),
        "stock": VllmServer(model, log=work / "stock.log", env={"VLLM_PLUGINS": ""}),
        "sparse": VllmServer(model, "--block-size", "32", "--additional-config", json.dumps(SPARSE_CONFIG),
                             log=work / "sparse.log", env={report.REPORT_DIR_ENV: str(work / "sparse-report")},
                             max_model_len=2048),
        "squeezed": VllmServer(model, "--block-size", "32", "--additional-config", json.dumps(SQUEEZED_CONFIG),
                               log=work / "squeezed.log", env={report.REPORT_DIR_ENV: str(work / "squeezed-report")},
                               max_model_len=2048),
        "medusa": VllmServer(model, "--speculative-config", json.dumps(
            {"method": "medusa", "model": str(heads), "num_speculative_tokens": heads_drafts}),
            "--additional-config", json.dumps({"afterburner": {"speculative": heads_settings}}),
            log=work / "medusa.log", env=ALL_CORES, max_model_len=2048),
        **({"hamburger": VllmServer(model, "--speculative-config", json.dumps(
            {"method": "hamburger", "model": str(drafter), "num_speculative_tokens": HAMBURGER_DRAFT}),
            "--additional-config", json.dumps(HAMBURGER_CONFIG), log=work / "hamburger.log", env=ALL_CORES,
            max_model_len=2048)}
           if drafter else {}),
        "local_linear": VllmServer(lla, "--additional-config", json.dumps(LLA_CONFIG), log=work / "local_linear.log"),
    }
    # Two phases, so at most four servers hold memory at once: the comparisons with stock and the selective
    # methods, then speculation and local-linear (the dense afterburner server stays up: it is the "off").
    phases = [["afterburner", "stock", "sparse", "squeezed"], [n for n in servers if n in PHASE_TWO]]
    print(f"[demo] starting vllm serve {len(servers)} times (SmolLM2-135M; the local-linear model) in two "
          f"phases, one after another (logs in {work}); about a minute each on 2 cores", flush=True)
    started = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on SIGTERM too

    def start(names: list[str]) -> bool:
        # One at a time: several cold starts at once on 2 cores outlast any sane timeout (each imports torch
        # and vLLM in three processes); one by one each takes about a minute.
        for name in names:
            try:
                servers[name].start().wait(timeout=600, progress=f"demo: {name} server")
            except (RuntimeError, TimeoutError) as exc:
                print(f"[demo] the {name} server did not come up; its log is {servers[name].log}\n{exc}",
                      file=sys.stderr)
                return False
            print(f"[demo] {name} server healthy on 127.0.0.1:{servers[name].port} after "
                  f"{time.time() - started:.0f} s", flush=True)
        return True

    codes: dict[str, int | None] = {}
    try:
        if not start(phases[0]):
            return 1
        same = 0
        for path, body in REQUESTS:
            prompt = body.get("prompt") or body["messages"][-1]["content"]
            print(f"\n{path}  prompt: {prompt!r}")
            answers = {name: _ask(servers[name], path, body) for name in ("afterburner", "stock", "sparse")}
            for name, (text, seconds) in answers.items():
                print(f"  {name:>11} ({seconds:4.1f} s): {text!r}")
            same += answers["afterburner"][0] == answers["stock"][0]
        print(f"\n{same}/{len(REQUESTS)} answers identical (greedy; afterburner's attention method here is "
              f"'{CONFIG['afterburner']['attention']['method']}', so they should all be)")
        constrained_ok = _constrained_section(servers, report_dir)
        _sparse_section(servers, work)
        _specpc_section(servers["afterburner"])
        codes.update({name: servers[name].stop() for name in phases[0][1:]})
        if not start(phases[1]):
            return 1
        medusa_ok = _speculation_section(servers, "medusa", f"Medusa speculative decoding (3 heads, {heads_note})")
        if "hamburger" in servers:
            medusa_ok &= _speculation_section(servers, "hamburger", "Micro-step drafter (HAMburger-style, up to "
                                              f"{HAMBURGER_DRAFT} tokens a step, its stop head choosing how many)")
        else:
            print("\nMicro-step drafter: not trained here; `make hamburger-drafter` builds it (~25 minutes on 2 "
                  "cores) and the next `make demo` shows it")
        lla_ok = _lla_section(servers["local_linear"], lla)
        _print_report(report_dir)
    finally:
        codes.update({name: server.stop() for name, server in servers.items()
                      if server.process is not None and name not in codes})
        print(f"\n[demo] servers stopped with their process groups: exit codes {codes}")
    return 0 if same == len(REQUESTS) and constrained_ok and medusa_ok and lla_ok else 1


if __name__ == "__main__":
    sys.exit(main())
