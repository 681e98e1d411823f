"""Greedy Medusa decoding with the torch reference on SmolLM2-135M (float32, one prompt) is token-for-token
plain greedy decoding, and untrained heads get drafts accepted (moved from
tests/unit/spec_decode/test_medusa_reference.py, which runs the same checks on the tiny model)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from afterburner.spec_decode.medusa.reference import medusa_generate
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63
from support.medusa import greedy_tokens, untrained_heads

HEADS = 3
PAPER_3 = build_tree([c for c in MC_SIM_7B_63 if len(c) <= HEADS], max_depth=HEADS)  # 45 nodes, top-10


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def test_greedy_medusa_is_greedy_decoding_on_smollm2(smollm2):
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids[0]
    out = medusa_generate(model, untrained_heads(model, HEADS), PAPER_3, prompt, max_new_tokens=16)
    assert out.tokens == greedy_tokens(model, prompt, 16)
    assert len(out.accepted_lengths) < 16  # drafts were accepted
