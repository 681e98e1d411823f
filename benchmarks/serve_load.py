"""`vllm serve` under load through the OpenAI API: afterburner (sparse attention + per-request AWRS) vs
stock vLLM (its own kernel; the constrained share through vLLM's built-in structured outputs), same mix,
same clients, one server at a time.

    python benchmarks/serve_load.py [--clients 32] [--seconds 120] [--servers stock afterburner]

Each of ``--clients`` concurrent clients sends requests back to back for ``--seconds``, drawn from a seeded
mix: plain chat (non-streaming), plain streaming, streaming that disconnects after 3 chunks (on purpose),
a regex and a JSON-schema constraint, and a ~1,500-token prompt (selective decode on the sparse server).
A request is *completed* (HTTP 200, whole body or stream), *failed* (an error status or a broken
connection not of our making) or *lost* (no answer within ``--timeout``: hung). Reported per server:
counts per kind, p50 / p99 latency of completed requests, completion tokens/s over the run, the server's
memory (RSS of its whole process group) after warm-up and at the end, constrained outputs that break
their constraint, and whether /health and a plain request still answer afterwards.
Writes benchmarks/results/serve_load.json. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "serve_load.json"
REGEX = r"[0-9]{3}-[0-9]{3}-[0-9]{4}"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer"}},
          "required": ["city", "population"], "additionalProperties": False}
SPARSE = {"attention": {"method": "sparse", "sparse": {"budget_ratio": 0.25, "dense_below_tokens": 1024}}}
KINDS = {"plain": 3, "stream": 3, "disconnect": 1, "regex": 2, "json": 2, "long": 1}  # weights


def _long_prompt() -> str:
    import sysconfig

    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    return text[:6000] + "\n\nIn one sentence, what does this module do?"


def request_body(kind: str, server: str, model: str, rng: random.Random) -> dict:
    topic = rng.choice(["rivers", "the moon", "sorting", "bread", "volcanoes", "chess", "clouds", "bees"])
    body = {"model": model, "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": f"Tell me one fact about {topic}."}]}
    if kind in ("stream", "disconnect"):
        body.update(stream=True, max_tokens=48)
    elif kind == "regex":
        body["messages"][0]["content"] = "Write a phone number."
        body["max_tokens"] = 20
        if server == "afterburner":
            body["vllm_xargs"] = {"awrs_regex": REGEX}
        else:
            body["structured_outputs"] = {"regex": REGEX}
    elif kind == "json":
        body["messages"][0]["content"] = "Give a city and its population as JSON."
        body["max_tokens"] = 40
        if server == "afterburner":
            body["vllm_xargs"] = {"awrs_json_schema": json.dumps(SCHEMA)}
        else:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    elif kind == "long":
        body["messages"][0]["content"] = _long_prompt()
        body["max_tokens"] = 16
    return body


def violates(kind: str, text: str) -> bool:
    """A constrained output that breaks its constraint (only checked when the request ended with "stop")."""
    if kind == "regex":
        return re.fullmatch(REGEX, text) is None
    if kind == "json":
        try:
            value = json.loads(text)
        except ValueError:
            return True
        return not (isinstance(value, dict) and set(value) == {"city", "population"}
                    and isinstance(value["population"], int))
    return False


async def one_request(session, url: str, kind: str, body: dict, timeout: float) -> dict:
    import aiohttp

    started = time.perf_counter()
    record = {"kind": kind, "status": "completed", "tokens": 0}
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    record.update(status="failed", error=f"HTTP {response.status}: {(await response.text())[:200]}")
                elif body.get("stream"):
                    chunks = 0
                    async for line in response.content:
                        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                            continue
                        chunks += 1
                        if kind == "disconnect" and chunks == 3:
                            record["status"] = "disconnected"
                            break
                    record["tokens"] = chunks
                else:
                    result = await response.json()
                    choice = result["choices"][0]
                    record["tokens"] = result["usage"]["completion_tokens"]
                    if choice["finish_reason"] == "stop" and violates(kind, choice["message"]["content"]):
                        record["violation"] = choice["message"]["content"][:200]
    except TimeoutError:
        record.update(status="lost", error=f"no answer in {timeout:.0f} s")
    except aiohttp.ClientError as error:
        record.update(status="failed", error=f"{type(error).__name__}: {error}"[:200])
    record["seconds"] = time.perf_counter() - started
    return record


async def drive(port: int, server: str, model: str, clients: int, seconds: float, timeout: float, seed: int):
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    kinds, weights = zip(*KINDS.items(), strict=True)
    deadline = time.perf_counter() + seconds
    records: list[dict] = []

    async def client(index: int) -> None:
        rng = random.Random(f"{seed}-{index}")
        connector = aiohttp.TCPConnector(limit=1, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.perf_counter() < deadline:
                kind = rng.choices(kinds, weights)[0]
                records.append(await one_request(session, url, kind, request_body(kind, server, model, rng), timeout))

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return records, time.perf_counter() - started


def group_rss_mb(pgid: int) -> float:
    import psutil

    total = 0
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid:
                total += process.memory_info().rss
        except (psutil.Error, ProcessLookupError):
            continue
    return total / 2**20


def summarize(records: list[dict], wall: float) -> dict:
    done = [r for r in records if r["status"] in ("completed", "disconnected")]
    latencies = sorted(r["seconds"] for r in records if r["status"] == "completed")
    per_kind = {}
    for kind in KINDS:
        rows = [r for r in records if r["kind"] == kind]
        per_kind[kind] = {status: sum(r["status"] == status for r in rows)
                          for status in ("completed", "disconnected", "failed", "lost")}
    return {
        "requests": len(records), "completed": sum(r["status"] == "completed" for r in records),
        "disconnected_on_purpose": sum(r["status"] == "disconnected" for r in records),
        "failed": sum(r["status"] == "failed" for r in records), "lost": sum(r["status"] == "lost" for r in records),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "completion_tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "plain_tokens_per_s": sum(r["tokens"] for r in done if r["kind"] in ("plain", "stream")) / wall,
        "violations": [r["violation"] for r in records if "violation" in r],
        "errors": sorted({r["error"] for r in records if "error" in r})[:10], "per_kind": per_kind,
    }


def run_server(name: str, model: Path, args, log_dir: Path) -> dict:
    from afterburner.plugins.devtools.vllm_server import VllmServer

    extra = ["--block-size", "32", "--max-num-seqs", str(args.clients), "--served-model-name", "m"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if name == "stock":
        env["VLLM_PLUGINS"] = ""
    else:
        extra += ["--additional-config", json.dumps({"afterburner": SPARSE})]
    server = VllmServer(model, *extra, log=log_dir / f"serve_load_{name}.log", env=env, max_model_len=4096)
    try:
        server.start().wait(progress=f"serve_load {name}")
        asyncio.run(drive(server.port, name, "m", 4, 10, args.timeout, seed=-1))  # warm-up
        rss_start = group_rss_mb(server.pgid)
        print(f"[serve_load] {name}: {args.clients} clients for {args.seconds} s ...", file=sys.stderr, flush=True)
        records, wall = asyncio.run(drive(server.port, name, "m", args.clients, args.seconds, args.timeout, 0))
        rss_end = group_rss_mb(server.pgid)
        after = asyncio.run(drive(server.port, name, "m", 1, 0.1, 60, seed=-2))[0]
        result = summarize(records, wall)
        result.update(wall_s=wall, rss_start_mb=rss_start, rss_end_mb=rss_end,
                      serving_after=all(r["status"] in ("completed", "disconnected") for r in after))
        return result
    finally:
        server.stop()


def main() -> None:
    from afterburner.plugins.cli.models import build_smollm2
    from afterburner.plugins.devtools.provenance import add_allow_dirty_argument, exit_if_refused, write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--timeout", type=float, default=300, help="seconds after which a request counts as lost")
    parser.add_argument("--servers", nargs="+", default=["stock", "afterburner"], choices=["stock", "afterburner"])
    parser.add_argument("--out", default=str(OUT))
    add_allow_dirty_argument(parser)
    args = parser.parse_args()
    exit_if_refused(parser, args.out, allow_dirty=args.allow_dirty)
    model = build_smollm2()
    log_dir = Path(os.environ.get("AFTERBURNER_CACHE", Path.home() / ".cache" / "afterburner"), "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {name: run_server(name, model, args, log_dir) for name in args.servers}
    print(f"\n{'server':12s} {'done':>5s} {'fail':>4s} {'lost':>4s} {'p50 s':>6s} {'p99 s':>6s} {'tok/s':>6s} "
          f"{'RSS MB start->end':>18s} {'bad':>3s}")
    for name, r in results.items():
        print(f"{name:12s} {r['completed']:5d} {r['failed']:4d} {r['lost']:4d} {r['p50_s'] or 0:6.2f} "
              f"{r['p99_s'] or 0:6.2f} {r['completion_tokens_per_s']:6.1f} "
              f"{r['rss_start_mb']:8.0f} -> {r['rss_end_mb']:6.0f} {len(r['violations']):3d}")
    write_result(Path(args.out), {"model": "SmolLM2-135M-Instruct", "clients": args.clients, "seconds": args.seconds,
                                  "mix": KINDS, "afterburner_config": SPARSE, "servers": results},
                 command=" ".join(["python", *sys.argv]), allow_dirty=args.allow_dirty)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
