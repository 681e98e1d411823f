"""`make demo`: vLLM with afterburner next to stock vLLM, on SmolLM2-135M, on this machine.

Starts two real `vllm serve` processes side by side (afterburner loaded; afterburner filtered out with
VLLM_PLUGINS=""), sends the same requests to both, prints the answers side by side, then what afterburner
registered and did in each engine process. Each feature issue adds its own section:
- constrained sampling: one request constrained by a JSON schema through AWRS (``vllm_xargs``), with the
  number of constraint checks it took, next to the same request unconstrained.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from afterburner.plugins import report
from afterburner.plugins.models import build_smollm2, cache_root
from afterburner.plugins.vllm.server import VllmServer

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache_root() / "vllm")}.items():
    os.environ.setdefault(key, value)

CONFIG = {"afterburner": {"attention": {"method": "dense"}}}
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


def main() -> int:
    model = build_smollm2()
    work = Path(tempfile.mkdtemp(prefix="afterburner-demo-"))
    report_dir = work / "report"
    servers = {
        "afterburner": VllmServer(model, "--additional-config", json.dumps(CONFIG), log=work / "afterburner.log",
                                  env={report.REPORT_DIR_ENV: str(report_dir)}),
        "stock": VllmServer(model, log=work / "stock.log", env={"VLLM_PLUGINS": ""}),
    }
    print(f"[demo] starting vllm serve twice on SmolLM2-135M (logs in {work}); ~1-2 minutes on 2 cores", flush=True)
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
        _print_report(report_dir)
    finally:
        codes = {name: server.stop() for name, server in servers.items()}
        print(f"\n[demo] servers stopped by PID: exit codes {codes}")
    return 0 if same == len(REQUESTS) and constrained_ok else 1


if __name__ == "__main__":
    sys.exit(main())
