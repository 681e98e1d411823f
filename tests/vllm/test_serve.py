"""A real `vllm serve` subprocess with afterburner: the plugin is active in each engine process, the
OpenAI endpoints answer (AWRS through `vllm_xargs` too; a malformed constraint is a 400 for that request
only), SIGTERM by PID stops it cleanly, and a bad --additional-config exits non-zero with one line."""

import json
import subprocess
import urllib.error
import urllib.request

import pytest
import regex
import torch
from engine_args import AFTERBURNER_SECTION
from transformers import AutoModelForCausalLM

from afterburner.plugins import report
from afterburner.plugins.devtools.vllm_server import free_port, group_alive, post, serve_command, vllm_server
from afterburner.spec_decode.draft.speckv import SpecKVSettings
from afterburner.spec_decode.draft.speckv_draft import speckv_keep
from afterburner.spec_decode.draft.speckv_reference import ATTENTION, greedy_with_kept, register_attention
from afterburner.spec_decode.draft.specpc_draft import load_draft

SPECKV_SETTINGS = {"window": 16, "lookahead": 4}


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    report_dir = folder / "report"
    # the tiny model is its own SpecPC and SpecKV draft (per request: vllm_xargs specpc_capacity,
    # speckv_capacity; requests that ask for neither run vLLM's kernel)
    attention = {**AFTERBURNER_SECTION["attention"], "method": "speckv",
                 "speckv": {"draft": str(tiny_model), **SPECKV_SETTINGS}}
    section = {**AFTERBURNER_SECTION, "attention": attention, "specpc": {"draft": str(tiny_model)}}
    with vllm_server(
        tiny_model, "--additional-config", json.dumps({"afterburner": section}),
        env={report.REPORT_DIR_ENV: str(report_dir)}, log=folder / "serve.log",
    ) as server:
        yield server, server.port, report_dir
    assert server.process.returncode == 0, "SIGTERM by PID must stop vllm serve cleanly"
    assert not group_alive(server.pgid), "no engine process may outlive its server"


def test_completions(served):
    _, port, _ = served
    body = post(port, "/v1/completions", {"prompt": "The module provides", "max_tokens": 8, "temperature": 0})
    choice = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 8 and isinstance(choice["text"], str)


def test_chat_completions(served):
    _, port, _ = served
    body = post(port, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
    })
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 6


def test_plugin_ran_in_every_engine_process_and_config_reached_the_worker(served):
    _, _, report_dir = served
    events = report.read_dir(report_dir)
    registered_pids = {e["pid"] for e in events if e["event"] == "registered"}
    # The API server and the EngineCore are separate processes under `vllm serve` (with one CPU worker
    # the worker runs inside the EngineCore process).
    assert len(registered_pids) >= 2, events
    workers = [e for e in events if e["event"] == "config" and e["where"] == "worker"]
    assert len(workers) == 1 and workers[0]["pid"] in registered_pids
    assert workers[0]["config"]["attention"]["sparse"]["budget_ratio"] == 0.125
    api = [e for e in events if e["event"] == "config" and e["where"] == "engine_config"]
    assert api and api[0]["pid"] != workers[0]["pid"]


def test_bad_additional_config_exits_nonzero_with_one_clear_line(tiny_model):
    bad = json.dumps({"afterburner": {"attention": {"sparse": {"recent_pages": -2}}}})
    run = subprocess.run(serve_command(tiny_model, free_port(), "--additional-config", bad),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [l for l in run.stderr.splitlines() if "afterburner.attention.sparse.recent_pages" in l]
    assert lines == [
        "ERROR [afterburner] invalid afterburner config from --additional-config: "
        "afterburner.attention.sparse.recent_pages: Input should be greater than or equal to 0 (got -2)"
    ]
    assert "Traceback" not in run.stderr


def test_awrs_over_the_openai_api_and_a_malformed_constraint_is_a_400_for_that_request_only(served):
    server, port, _ = served
    pattern = "(yes|no), [0-9]{2}"
    body = post(port, "/v1/completions", {"prompt": "Answer:", "max_tokens": 20, "temperature": 0.7, "seed": 1,
                                          "vllm_xargs": {"awrs_regex": pattern}})
    assert regex.fullmatch(pattern, body["choices"][0]["text"])
    with pytest.raises(urllib.error.HTTPError) as err:
        post(port, "/v1/completions", {"prompt": "Answer:", "max_tokens": 5, "vllm_xargs": {"awrs_regex": "(x"}})
    assert err.value.code == 400 and "unclosed group" in err.value.read().decode()
    body = post(port, "/v1/completions", {"prompt": "Still serving?", "max_tokens": 3})
    assert body["usage"]["completion_tokens"] == 3


def _drafted_on(report_dir, event: str) -> list[str]:
    """The threads the API server ran ``event``'s drafts on."""
    return [e["drafted_on"] for e in report.read_dir(report_dir) if e["event"] == event and "drafted_on" in e]


def test_specpc_per_request_over_the_openai_api(served):
    """The prompt the engine sees is what the draft kept; the draft ran on afterburner's draft thread, not on
    the server's event loop (where it would stall every other request's stream)."""
    _, port, report_dir = served
    prompt = "Open the file and read every line; return a new list of the words it holds. " * 10
    plain = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert plain["usage"]["prompt_tokens"] > 64
    kept = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                          "vllm_xargs": {"specpc_capacity": 64}})
    assert kept["usage"]["prompt_tokens"] == 64 and kept["usage"]["completion_tokens"] == 4
    whole = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                           "vllm_xargs": {"specpc_capacity": 4096}})
    assert whole["usage"] == plain["usage"] and whole["choices"][0]["text"] == plain["choices"][0]["text"]
    threads = _drafted_on(report_dir, "specpc_request")
    assert threads and all(name.startswith("afterburner-draft") for name in threads), threads


def test_speckv_per_request_over_the_openai_api(served, tiny_model):
    """The choice crosses from the API server to the engine process inside the request; the engine decodes
    over it exactly as the plain-torch reference does."""
    _, port, report_dir = served
    prompt = "Open the file and read every line; return a new list of the words it holds. " * 10
    asked = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    plain = post(port, "/v1/completions", asked)
    kept = post(port, "/v1/completions", {**asked, "vllm_xargs": {"speckv_capacity": 64}})
    prompt_ids = kept["choices"][0]["prompt_token_ids"]
    assert kept["usage"] == plain["usage"] and len(prompt_ids) > 2 * 64  # SpecKV shortens no prompt
    register_attention()
    draft = load_draft(tiny_model)  # the tiny model is its own draft: the choice the API server made
    mask = speckv_keep(draft, prompt_ids, SpecKVSettings(capacity=64, **SPECKV_SETTINGS), target_layers=2).mask
    target = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=ATTENTION)
    assert kept["choices"][0]["token_ids"] == greedy_with_kept(target.eval(), prompt_ids, mask, 8)
    assert greedy_with_kept(target, prompt_ids, None, 8) == plain["choices"][0]["token_ids"]
    assert kept["choices"][0]["token_ids"] != plain["choices"][0]["token_ids"]  # the choice acted
    threads = _drafted_on(report_dir, "speckv_request")
    assert threads and all(name.startswith("afterburner-draft") for name in threads), threads


def test_specpc_and_speckv_in_one_request_both_draft_off_the_event_loop(served):
    """SpecKV chooses within what SpecPC kept: the draft thread drafts both in that order (a SpecKV draft of
    the uncompressed prompt would not match the request and be drafted again on the loop)."""
    _, port, report_dir = served
    prompt = "Each line of the log names a host, a port and a status code for one request. " * 12
    before = len(_drafted_on(report_dir, "speckv_request"))
    body = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                          "vllm_xargs": {"specpc_capacity": 96, "speckv_capacity": 48}})
    assert body["usage"]["prompt_tokens"] == 96 and body["usage"]["completion_tokens"] == 4
    events = [e for e in report.read_dir(report_dir) if e["event"] == "speckv_request" and "drafted_on" in e][before:]
    assert [e["prompt_tokens"] for e in events] == [96]
    assert events[0]["drafted_on"].startswith("afterburner-draft")
    assert _drafted_on(report_dir, "specpc_request")[-1].startswith("afterburner-draft")


# Bad requests over HTTP: each fails alone (400) or ends cleanly; the server stays healthy and answers a
# good request exactly as before. (name, body, expected status: 400, or 200 with a clean finish)
BAD_REQUESTS = [
    ("invalid regex", {"vllm_xargs": {"awrs_regex": "(x"}}, 400),
    ("schema that is not JSON", {"vllm_xargs": {"awrs_json_schema": "{nope"}}, 400),
    ("huge schema", {"vllm_xargs": {"awrs_json_schema": json.dumps(
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(10_000)}})}}, 400),
    ("schema of 3,500 optional properties", {"vllm_xargs": {"awrs_json_schema": json.dumps(
        {"type": "object", "properties": {f"k{i}": {} for i in range(3500)}})}}, 400),
    ("two constraint kinds", {"vllm_xargs": {"awrs_regex": "a", "awrs_lark": "start: \"b\""}}, 400),
    ("unknown awrs key", {"vllm_xargs": {"awrs_regexp": "a"}}, 400),
    ("max_checks of the wrong type", {"vllm_xargs": {"awrs_regex": "a", "awrs_max_checks": "many"}}, 400),
    ("max_checks zero", {"vllm_xargs": {"awrs_regex": "a", "awrs_max_checks": 0}}, 400),
    ("grammar that allows nothing", {"vllm_xargs": {"awrs_regex": "[^\\s\\S]"}}, 200),
    ("special token the vocabulary lacks", {"vllm_xargs": {"awrs_lark": "start: <|nonexistent|>"}}, 200),
    ("SpecPC capacity below its window", {"vllm_xargs": {"specpc_capacity": 8}}, 400),
    ("SpecPC capacity not an integer", {"vllm_xargs": {"specpc_capacity": "half"}}, 400),
    ("SpecKV capacity within its window", {"vllm_xargs": {"speckv_capacity": 16}}, 400),
    ("SpecKV choice sent by the client", {"vllm_xargs": {"afterburner_speckv_keep": {"shape": [1], "bits": ""}}}, 400),
    ("max_tokens zero", {"max_tokens": 0}, 400),
    ("negative temperature", {"temperature": -1}, 400),
]


@pytest.mark.parametrize("name, extra, status", BAD_REQUESTS, ids=[name for name, _, _ in BAD_REQUESTS])
def test_a_bad_request_fails_alone_and_the_server_keeps_serving(served, name, extra, status):
    _, port, _ = served
    good = {"prompt": "The module provides", "max_tokens": 6, "temperature": 0}
    before = post(port, "/v1/completions", good)["choices"][0]["text"]
    body = {"prompt": "Answer:", "max_tokens": 8, "temperature": 0, **extra}
    if status == 400:
        with pytest.raises(urllib.error.HTTPError) as err:
            post(port, "/v1/completions", body)
        assert err.value.code == 400, (name, err.value.read()[:300])
    else:
        choice = post(port, "/v1/completions", body)["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["text"] == "", name
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as health:
        assert health.status == 200
    assert post(port, "/v1/completions", good)["choices"][0]["text"] == before
