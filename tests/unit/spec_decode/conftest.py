"""The tiny model as a draft (SpecPC / SpecKV runners) and as eager transformers (their yardstick)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from afterburner.spec_decode.draft.specpc_draft import load_draft


@pytest.fixture(scope="module")
def draft(tiny_model, one_torch_thread):
    return load_draft(tiny_model)


@pytest.fixture(scope="module")
def eager(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager").eval()
