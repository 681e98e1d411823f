"""SpecKV per request through a real ``sglang.Engine`` on CPU (``--attention-backend afterburner-speckv``,
``custom_params.speckv_capacity``): the engine's greedy output equals the plain-torch reference of decoding over
the draft's kept entries (``speckv_reference``) for every request of a mixed batch that asks (radix-cache hits
too); requests that do not ask, or whose prompt fits the capacity, are token-identical to plain decoding; the
counters say what was read; drafts run on afterburner's draft thread; bad requests, and a server without the
backend, refuse in one line."""

import pytest
from engine_setup import GREEDY, SCRIPTS

from afterburner.plugins import report
from support import speckv as checks

pytestmark = [pytest.mark.sglang, pytest.mark.slow]


@pytest.fixture(scope="module")
def result(tiny_model, tmp_path_factory):
    from support.worker import run_worker_or_fail

    report_dir = tmp_path_factory.mktemp("report")
    value, _ = run_worker_or_fail(SCRIPTS / "speckv_engine.py", tiny_model, tmp_path_factory.mktemp("speckv"),
                                  env={report.REPORT_DIR_ENV: str(report_dir)},
                                  unset=["AFTERBURNER_DISABLE", "AFTERBURNER_CONFIG"], timeout=480)
    return value


def test_engine_decodes_over_the_drafts_choice_and_plainly_where_none_applies(result, tiny_model):
    checks.check_plain_rows(result)
    checks.check_decodes_over_the_choice(result, checks.reference_model(tiny_model))


def test_counters_say_what_was_read(result):
    """Rows with a choice read C + 1 prompt entries and the tokens since per layer and kv head; rows without
    one, batched with them, read everything (what they read is counted too, so the difference is the choice's)."""
    lengths = [len(ids) for ids in result["prompt_ids"]]
    counts = result["counts"]
    decode_steps = checks.MAX_TOKENS - 1  # the first token comes from the dense prefill
    skipped = sum(lengths[r] - (checks.CAPACITY + 1) for r in checks.SELECTIVE) * decode_steps * checks.CELLS
    assert counts["tokens_in_context"] - counts["tokens_read"] == skipped
    assert counts["speckv_selections"] == len(checks.SELECTIVE) * decode_steps * checks.LAYERS


def test_drafts_run_off_the_event_loop_and_bad_requests_refuse_in_one_line(result):
    checks.check_refusals(result["refused"])
    assert sorted((n, kept) for n, kept, _ in result["events"]) == checks.expected_events(result)
    assert all(thread.startswith("afterburner-draft") for n, kept, thread in result["events"] if kept < n)


def test_a_server_without_the_backend_refuses_the_request_alone(engine):
    eng, _ = engine  # the session engine: torch_native
    ids = list(range(5, 70))
    with pytest.raises(ValueError, match="needs a server started with --attention-backend afterburner-speckv"):
        eng.generate(input_ids=ids, sampling_params={**GREEDY, "custom_params": {"speckv_capacity": 32}})
    assert len(eng.generate(input_ids=ids, sampling_params=dict(GREEDY))["output_ids"]) == GREEDY["max_new_tokens"]
