"""`make demo`: vLLM with afterburner next to stock vLLM, on SmolLM2-135M, on this machine.

Starts two real `vllm serve` processes side by side (afterburner loaded; afterburner filtered out with
VLLM_PLUGINS=""), sends the same requests to both, prints the answers side by side, then what afterburner
registered and did in each engine process. Each feature issue adds its own section:
- constrained sampling: one request constrained by a JSON schema through AWRS (``vllm_xargs``), with the
  number of constraint checks it took, next to the same request unconstrained.
- sparse attention: a third server with ``attention.method: "sparse"`` (1/4 budget, 32-token blocks)
  answers a ~1,750-token passkey prompt next to dense attention: the answers and the share of the
  context's KV blocks that sparse decode steps read.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from afterburner.plugins import report
from afterburner.plugins.lm_eval.dataset import TASKS_DIR, read_jsonl
from afterburner.plugins.lm_eval.generators import passkey_prompt
from afterburner.plugins.models import build_smollm2, cache_root
from afterburner.plugins.vllm.server import VllmServer

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache_root() / "vllm")}.items():
    os.environ.setdefault(key, value)

CONFIG = {"afterburner": {"attention": {"method": "dense"}}}
SPARSE_CONFIG = {"afterburner": {"attention": {"method": "sparse", "sparse": {"budget_ratio": 0.25,
                                                                             "dense_below_tokens": 512}}}}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                           "population_millions": {"type": "number"}},
          "required": ["city", "population_millions"], "additionalProperties": False}
CONSTRAINED_PROMPT = "Give the largest city of France and its population as JSON:"
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
                print(f"    registered on vLLM {event['version']} ({event['status']}): {', '.join(event['registered'])}")
            elif event["event"] == "config":
                print(f"    config seen at {event['where']}: {json.dumps(event['config'])}")
            elif event["event"] == "awrs":
                print(f"    AWRS request ({event['kind']}): {event['tokens']} tokens, {event['checks']} checks")
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


def _sparse_section(servers: dict[str, VllmServer], report_dir: Path) -> None:
    doc = read_jsonl(TASKS_DIR / "afterburner_passkey" / "afterburner_passkey_2048.jsonl")[0]
    body = {"prompt": passkey_prompt(doc["context"]), "max_tokens": 12}
    print(f"\nSparse attention: passkey prompt of ~{len(body['prompt']) // 4} tokens, key {doc['passkey']}")
    for name in ("afterburner", "sparse"):
        text, seconds = _ask(servers[name], "/v1/completions", body)
        label = "dense" if name == "afterburner" else "sparse 1/4"
        print(f"  {label:>11} ({seconds:4.1f} s): {text!r}  {'found' if doc['passkey'] in text else 'missed'}")
    stats = [e for e in report.read_dir(report_dir) if e["event"] == "sparse_attention"]
    if stats:
        last = stats[-1]
        print(f"  sparse decode steps read {last['blocks_read']:,} of {last['blocks_in_context']:,} KV blocks "
              f"({last['blocks_read'] / max(1, last['blocks_in_context']):.0%}) over {last['forward_calls']} "
              "layer calls")


def main() -> int:
    model = build_smollm2()
    work = Path(tempfile.mkdtemp(prefix="afterburner-demo-"))
    report_dir = work / "report"
    servers = {
        "afterburner": VllmServer(model, "--additional-config", json.dumps(CONFIG), log=work / "afterburner.log",
                                  env={report.REPORT_DIR_ENV: str(report_dir)}, max_model_len=2048),
        "stock": VllmServer(model, log=work / "stock.log", env={"VLLM_PLUGINS": ""}),
        "sparse": VllmServer(model, "--block-size", "32", "--additional-config", json.dumps(SPARSE_CONFIG),
                             log=work / "sparse.log", env={report.REPORT_DIR_ENV: str(work / "sparse-report")},
                             max_model_len=2048),
    }
    print(f"[demo] starting vllm serve three times on SmolLM2-135M (logs in {work}); ~2 minutes on 2 cores",
          flush=True)
    started = time.time()
    try:
        for server in servers.values():
            server.start()
        for name, server in servers.items():
            server.wait()
            print(f"[demo] {name} server healthy on 127.0.0.1:{server.port} after {time.time() - started:.0f} s",
                  flush=True)
        same = 0
        for path, body in REQUESTS:
            prompt = body.get("prompt") or body["messages"][-1]["content"]
            print(f"\n{path}  prompt: {prompt!r}")
            answers = {name: _ask(server, path, body) for name, server in servers.items()}
            for name, (text, seconds) in answers.items():
                print(f"  {name:>11} ({seconds:4.1f} s): {text!r}")
            same += answers["afterburner"][0] == answers["stock"][0]
        print(f"\n{same}/{len(REQUESTS)} answers identical (greedy; afterburner's attention method here is "
              f"'{CONFIG['afterburner']['attention']['method']}', so they should all be)")
        constrained_ok = _constrained_section(servers, report_dir)
        _sparse_section(servers, work / "sparse-report")
        _print_report(report_dir)
    finally:
        codes = {name: server.stop() for name, server in servers.items()}
        print(f"\n[demo] servers stopped by PID: exit codes {codes}")
    return 0 if same == len(REQUESTS) and constrained_ok else 1


if __name__ == "__main__":
    sys.exit(main())
