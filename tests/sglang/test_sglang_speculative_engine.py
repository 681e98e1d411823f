"""afterburner's speculative algorithms (Medusa, the micro-step drafter, a draft model) through a real SGLang
engine on CPU: ``--attention-backend torch_native``, whose verify steps run afterburner's tree attention
(``plugins/sglang/verify_attention.py``), and the CPU-build ops of sgl_kernel that SGLang's speculative path
calls, from the test shim's torch versions (``shim/sgl_kernel/cpu_spec_ops.py``). Everything else is
SGLang's: scheduler, KV slots, its greedy tree walk, the moves of accepted KV, its speculative metrics.

Greedy output equals the engine's without speculation token for token, on a batch of prompts of 4 to 189
tokens whose last is a prefix-cache hit, also when SGLang retracts requests mid-speculation; drafts are
accepted (a run that rejected every draft would pass the equality trivially), as many as the engine-free
references accept. Sampled requests: verified by afterburner's lossless rule (the tokens fit the target's
distribution), refused one by one where they set what that rule does not reproduce."""

import json
import shutil

import pytest
import torch
from engine_setup import SPEC_GREEDY, SPEC_PROMPTS, SPEC_SAMPLING, spec_run
from transformers import AutoConfig, AutoModelForCausalLM

from afterburner.plugins.sglang import hamburger
from afterburner.spec_decode.draft.confident_chain import speculative_generate as confident_generate
from afterburner.spec_decode.draft.derive import derive_draft
from afterburner.spec_decode.draft.draft_tree import draft_tree, draft_tree_generate
from afterburner.spec_decode.hamburger.checkpoint import load_drafter, save_drafter
from afterburner.spec_decode.hamburger.reference import speculative_generate
from afterburner.spec_decode.medusa.checkpoint import save_heads
from afterburner.spec_decode.medusa.distill_data import load_base
from support.hamburger import lens_drafter
from support.medusa import untrained_heads
from support.stats import chi_square_p

pytestmark = pytest.mark.sglang


@pytest.fixture(scope="module")
def drafts(tiny_model, tmp_path_factory):
    """Draft folders for the tiny model whose drafts it sometimes accepts (it repeats itself): Medusa heads
    that echo its own next-token guess, the logit-lens micro-step drafter (with the config.json
    ``model_type`` SGLang reads), and its first layer as a draft model."""
    root = tmp_path_factory.mktemp("drafts")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    heads = save_heads(untrained_heads(base, 3), root / "echo", lm_head_weight=base.lm_head.weight)
    drafter = save_drafter(root / "lens", lens_drafter(tiny_model))
    config = json.loads((drafter / "config.json").read_text())
    (drafter / "config.json").write_text(json.dumps({**config, "model_type": hamburger.FOLDER_CONFIG.model_type}))
    return {"AFTERBURNER_MEDUSA": heads, "AFTERBURNER_HAMBURGER": drafter,
            "AFTERBURNER_DRAFT": derive_draft(tiny_model, root / "l1", layers=1)}


@pytest.fixture(scope="module")
def target(tiny_model):
    """The tiny model and its tokenizer, for the engine-free references."""
    return load_base(tiny_model)


@pytest.fixture(scope="module")
def draft_lm(drafts):
    """The draft model of the AFTERBURNER_DRAFT runs, for the engine-free references."""
    return AutoModelForCausalLM.from_pretrained(drafts["AFTERBURNER_DRAFT"]).eval()


RUNS = {  # name: (algorithm, verified nodes with the root, afterburner.speculative)
    "medusa-chain": ("AFTERBURNER_MEDUSA", 4, {"tree": "chain"}),
    "medusa-tree": ("AFTERBURNER_MEDUSA", 8, {"tree": "paper"}),
    "hamburger-chain": ("AFTERBURNER_HAMBURGER", 5, {"stop_threshold": 0.0}),  # every chain full length
    "draft-tree": ("AFTERBURNER_DRAFT", 6, {"tree": "paper"}),
}


def _run(model, drafts, name, *, retract=False, report_dir=None):
    algorithm, nodes, speculative = RUNS[name]
    return spec_run(model, {"speculative_algorithm": algorithm, "speculative_draft_model_path": str(drafts[algorithm]),
                            "speculative_num_draft_tokens": nodes}, {"speculative": speculative}, retract=retract,
                    report_dir=report_dir)


@pytest.fixture(scope="module")
def plain(tiny_model):
    return spec_run(tiny_model, {})


@pytest.fixture(scope="module")
def runs(tiny_model, drafts, tmp_path_factory):
    return {name: _run(tiny_model, drafts, name, report_dir=tmp_path_factory.mktemp(f"report-{name}"))
            for name in RUNS}


def drafts_per_step(result) -> float:
    meta = result["meta"]
    return sum(m["spec_num_correct_drafts"] for m in meta) / sum(m["spec_verify_ct"] for m in meta)


@pytest.mark.parametrize("name", list(RUNS))
def test_greedy_output_is_the_engines_own_and_drafts_are_accepted(plain, runs, name):
    result = runs[name]
    assert result["tokens"] == plain["tokens"]
    assert drafts_per_step(result) > 0, result["meta"]
    # every request was verified by the speculative worker, and the repeated prompt hit the prefix cache
    assert all(m["spec_verify_ct"] > 0 for m in result["meta"]), result["meta"]
    assert result["meta"][-1]["cached_tokens"] > 0, result["meta"]


@pytest.mark.parametrize("name", list(RUNS))
def test_a_sampled_request_runs_beside_a_greedy_one_and_one_with_top_p_fails_alone(plain, runs, name):
    """On CPU SGLang's own verify takes the argmax whatever the temperature; afterburner verifies sampled
    requests itself (``sampled_verify``) and refuses, with one line, what it does not reproduce."""
    greedy, sampled, top_p = runs[name]["mixed"]
    assert greedy["tokens"] == plain["tokens"][0] and greedy["finish"]["type"] == "length"
    assert sampled["finish"]["type"] == "length" and len(sampled["tokens"]) == 24 and sampled["spec_verify_ct"] > 0
    assert sampled["tokens"] != plain["tokens"][1]  # sampled, not the greedy text
    assert top_p["error"] == (
        f"--speculative-algorithm {RUNS[name][0]} on CPU verifies sampled requests by temperature alone: this "
        "request sets top_p; leave them unset, send temperature 0, or use a server without speculation")
    assert "error" not in plain["mixed"][2]


def _expected_distribution(target, samples) -> torch.Tensor:
    """The mean, over samples and over their tokens 2 and 3, of the target's distribution of that token
    given the prompt and the tokens before it (SPEC_SAMPLING's temperature): the expected frequencies of the
    tokens the verify steps emitted, if they are lossless."""
    base, tokenizer = target
    prompt = tokenizer(SPEC_PROMPTS[0])["input_ids"]
    ids = torch.tensor([prompt + list(sample) for sample in samples])
    with torch.no_grad():
        logits = base(input_ids=ids).logits[:, len(prompt): len(prompt) + 2].double()  # predicts tokens 2 and 3
    return torch.softmax(logits / SPEC_SAMPLING["temperature"], dim=-1).mean(dim=(0, 1))


@pytest.mark.parametrize("name", [None, "medusa-tree", "hamburger-chain", "draft-tree"])
def test_sampled_tokens_follow_the_targets_distribution(target, plain, runs, name):
    """Chi-square goodness of fit of the verify steps' tokens (SPEC_SAMPLES samples x 2 positions) against
    the target's own distribution, in bins of expected count >= 5 and the rest pooled; None: SGLang without
    speculation, the test's control. Fixed seeds (engine random_seed 0); a lossless verify fails this at
    level 0.001 once in a thousand. Drafts were accepted, so acceptance, not only the residual, is tested."""
    result = plain if name is None else runs[name]
    samples = result["samples"]
    expected = _expected_distribution(target, samples)
    observed = torch.bincount(torch.tensor([t for sample in samples for t in sample[1:]]),
                              minlength=expected.numel()).double()
    big = expected * observed.sum() >= 5
    assert int(big.sum()) >= 5, "too few bins to test"
    bins_expected = torch.cat([expected[big], expected[~big].sum()[None]])
    bins_observed = torch.cat([observed[big], observed[~big].sum()[None]])
    assert chi_square_p(bins_observed, bins_expected) > 1e-3
    if name is not None:
        assert sum(m["spec_num_correct_drafts"] for m in result["samples_meta"]) > 0


def retractions(result) -> int:
    return sum(m["num_retractions"] for m in result["meta"])


@pytest.fixture(scope="module")
def plain_retracted(tiny_model):
    result = spec_run(tiny_model, {}, retract=True)
    assert retractions(result) > 0
    return result


@pytest.mark.parametrize("name", ["medusa-tree", "hamburger-chain", "draft-tree"])
def test_retracted_requests_keep_the_greedy_output(tiny_model, drafts, plain, plain_retracted, name):
    """SGLang retracts running requests mid-speculation (its own ``retract_decode``, forced every 3 steps by
    its test switch) and runs them again from their tokens so far: the output stays the greedy output."""
    result = _run(tiny_model, drafts, name, retract=True)
    assert retractions(result) > 0, result["meta"]
    assert result["tokens"] == plain_retracted["tokens"] == plain["tokens"]
    assert drafts_per_step(result) > 0, result["meta"]


def test_the_medusa_tree_accepts_more_per_step_than_the_chain(runs):
    assert drafts_per_step(runs["medusa-tree"]) > drafts_per_step(runs["medusa-chain"])


def test_the_micro_step_drafter_accepts_what_the_reference_accepts(target, drafts, runs):
    """SGLang's counters equal the engine-free reference's drafts accepted (chains of 4, no stop) on each
    prompt: the engine's EAGLE-3 capture hands the drafter the right layer at the right position."""
    base, tokenizer = target
    drafter = load_drafter(drafts["AFTERBURNER_HAMBURGER"])
    drafter.attach_base(base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    expected = [sum(speculative_generate(base, drafter, torch.tensor(tokenizer(prompt)["input_ids"]),
                                         SPEC_GREEDY["max_new_tokens"], stop_threshold=None)[1])
                for prompt in SPEC_PROMPTS]
    assert [m["spec_num_correct_drafts"] for m in runs["hamburger-chain"]["meta"]] == expected


@pytest.fixture(scope="module")
def vocab_run(tiny_model, drafts, plain, tmp_path_factory):
    """The micro-step drafter's chain with a drafting vocabulary: the folder ranks the tokens of the engine's
    greedy outputs by count (then the rest by id), and the drafter scores the top half of those only."""
    from collections import Counter

    from afterburner.spec_decode import draft_vocab

    folder = shutil.copytree(drafts["AFTERBURNER_HAMBURGER"], tmp_path_factory.mktemp("vocab") / "drafter")
    counts = Counter(token for tokens in plain["tokens"] for token in tokens)
    written = [token for token, _ in counts.most_common()]
    vocab = AutoConfig.from_pretrained(tiny_model).vocab_size
    draft_vocab.save(folder, torch.tensor(written + sorted(set(range(vocab)) - set(written))))
    size = max(len(written) // 2, 1)
    result = spec_run(tiny_model, {"speculative_algorithm": "AFTERBURNER_HAMBURGER", "speculative_num_draft_tokens": 5,
                                   "speculative_draft_model_path": str(folder)},
                      {"speculative": {"stop_threshold": 0.0, "draft_vocab": size}})
    return folder, size, result


def test_the_micro_step_drafter_with_a_drafting_vocabulary_accepts_what_the_reference_accepts(target, plain,
                                                                                              vocab_run):
    """Greedy output unchanged, and accepted drafts equal the engine-free reference's with the same drafting
    vocabulary prompt by prompt, which differ from the whole vocabulary's (so the setting is not ignored)."""
    folder, size, result = vocab_run
    assert result["tokens"] == plain["tokens"]
    base, tokenizer = target
    from afterburner.spec_decode import draft_vocab

    embed, lm_head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    accepted = {}
    for name, ids in (("vocab", draft_vocab.load(folder, size, lm_head.shape[0])), ("all", None)):
        drafter = load_drafter(folder)
        drafter.attach_base(embed, lm_head, ids)
        accepted[name] = [sum(speculative_generate(base, drafter, torch.tensor(tokenizer(prompt)["input_ids"]),
                                                   SPEC_GREEDY["max_new_tokens"], stop_threshold=None)[1])
                          for prompt in SPEC_PROMPTS]
    assert [m["spec_num_correct_drafts"] for m in result["meta"]] == accepted["vocab"]
    assert accepted["vocab"] != accepted["all"] and sum(accepted["vocab"]) > 0


def test_the_draft_model_tree_accepts_what_the_reference_accepts(target, draft_lm, runs):
    """SGLang's counters equal the engine-free reference's (``draft_tree_generate``, the paper's tree of 5
    drafted nodes) prompt by prompt: the draft sees each request's tokens up to its root, accepted drafts
    included."""
    base, tokenizer = target
    tree = draft_tree("paper", RUNS["draft-tree"][1] - 1)
    expected = [sum(draft_tree_generate(base, draft_lm, tree, torch.tensor(tokenizer(prompt)["input_ids"]),
                                        SPEC_GREEDY["max_new_tokens"]).accepted) for prompt in SPEC_PROMPTS]
    assert [m["spec_num_correct_drafts"] for m in runs["draft-tree"]["meta"]] == expected


def test_the_draft_model_reads_each_request_once_through_its_cache(runs):
    """The draft keeps a KV cache per request across steps: each request that left the batch reports the
    tokens its draft read: at least its sequence (all of it was read once), and over the run a small share
    of what re-reading the sequence at every draft pass (the drafter before its cache) would have read."""
    events = [e for e in runs["draft-tree"]["report"] if e["event"] == "draft_kv"]
    assert len(events) >= len(SPEC_PROMPTS), events
    for event in events:
        assert event["length"] <= event["fed"] <= event["whole"], event
    assert sum(e["fed"] for e in events) < sum(e["whole"] for e in events) / 3, events


@pytest.fixture(scope="module")
def confidence_threshold(target, draft_lm, plain) -> float:
    """The draft's median probability of its own greedy token along the batch's greedy outputs: a stop there
    cuts about half the chains' tokens."""
    _, tokenizer = target
    probabilities = []
    with torch.no_grad():
        for prompt, output in zip(SPEC_PROMPTS, plain["tokens"], strict=True):
            ids = torch.tensor([tokenizer(prompt)["input_ids"] + output])
            probabilities += draft_lm(input_ids=ids).logits[0].softmax(-1).max(-1).values.tolist()
    return float(torch.tensor(probabilities).median())


def test_the_draft_models_confidence_stop_cuts_chains_as_the_reference_does(tiny_model, drafts, target, draft_lm,
                                                                             plain, confidence_threshold):
    """A chain of up to 4 drafts cut before the first whose draft probability is below the threshold: greedy
    output unchanged, and SGLang accepts per prompt exactly what the engine-free reference
    (``confident_chain.speculative_generate``) accepts, where the stop shortened chains."""
    result = spec_run(tiny_model, {"speculative_algorithm": "AFTERBURNER_DRAFT", "speculative_num_draft_tokens": 5,
                                   "speculative_draft_model_path": str(drafts["AFTERBURNER_DRAFT"])},
                      {"speculative": {"tree": "chain", "stop_threshold": confidence_threshold}})
    assert result["tokens"] == plain["tokens"]
    base, tokenizer = target
    references = [confident_generate(base, draft_lm, torch.tensor(tokenizer(prompt)["input_ids"]),
                                     SPEC_GREEDY["max_new_tokens"], max_drafts=4, threshold=confidence_threshold)
                  for prompt in SPEC_PROMPTS]
    proposed = [n for _, steps, _ in references for n in steps]
    assert 0 < sum(proposed) < 4 * len(proposed)  # the stop cut some chains, not all
    assert [m["spec_num_correct_drafts"] for m in result["meta"]] == [sum(acc) for _, _, acc in references]
