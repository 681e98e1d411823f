"""The tiny model as a draft (SpecPC / SpecKV runners) and as eager transformers (their yardstick); the tiny
model with its first layer as draft model (the draft-model proposers' references); the trainers' corpus."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from afterburner.plugins.lm_eval.text import local_sentences
from afterburner.spec_decode.draft.specpc_draft import load_draft


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few hundred tokens of local text: the self-distillation trainers' corpus."""
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(" ".join(local_sentences()[:60]))
    return path


@pytest.fixture(scope="module")
def draft(tiny_model, one_torch_thread):
    return load_draft(tiny_model)


@pytest.fixture(scope="module")
def eager(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def target_and_layer_draft(tiny_model, tmp_path_factory):
    """(target, its first layer as a draft model, two prompts' token ids): the draft-model references' models."""
    from afterburner.spec_decode.draft.derive import derive_draft
    from afterburner.spec_decode.medusa.distill_data import load_base

    target, tokenizer = load_base(tiny_model)
    folder = derive_draft(tiny_model, tmp_path_factory.mktemp("draft") / "l1", layers=1)
    draft = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [torch.tensor(tokenizer(text)["input_ids"]) for text in ("The cat sat on the", "Numbers: 1 2 3")]
    return target, draft, prompts
