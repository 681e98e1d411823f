"""What the SpecKV engine tests check on their scripts' results, for vLLM (``tests/vllm/scripts/speckv_greedy.py``)
and SGLang (``tests/sglang/scripts/speckv_engine.py``): the same mixed batch on the tiny model (two long prompts
asking for a capacity, a long prompt not asking, a short one asking, the first asked again), greedy with a
one-layer draft, compared with the plain-torch reference of decoding over the draft's choice."""

import torch

from afterburner.spec_decode.draft.speckv_reference import ATTENTION, greedy_with_kept, register_attention

CAPACITY, WINDOW, MAX_TOKENS = 48, 16, 10  # the scripts' settings
LAYERS = KV_HEADS = 2  # the tiny model
CELLS = LAYERS * KV_HEADS  # a position's (layer, kv head) entries, each counted
SELECTIVE = (0, 1, 4)  # the rows whose request carries a choice


def reference_model(model_dir):
    from transformers import AutoModelForCausalLM

    register_attention()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTENTION).eval()


def check_plain_rows(result: dict) -> None:
    assert result["full"] == result["plain"]
    assert result["chosen"][2] == result["plain"][2]  # the long prompt that did not ask, batched with those that did
    assert result["chosen"][3] == result["plain"][3]  # asked, but fits the capacity


def check_decodes_over_the_choice(result: dict, reference) -> None:
    lengths = [len(ids) for ids in result["prompt_ids"]]
    assert min(lengths[0], lengths[1]) > 2 * CAPACITY and lengths[3] < CAPACITY
    for row in SELECTIVE:
        mask = torch.tensor(result["masks"][row])
        assert mask.shape == (LAYERS, KV_HEADS, lengths[row])
        assert mask.sum(-1).eq(CAPACITY + 1).all() and mask[:, :, -WINDOW - 1:].all()
        expected = greedy_with_kept(reference, result["prompt_ids"][row], mask, MAX_TOKENS)
        assert result["chosen"][row] == expected, row
    assert result["chosen"][4] == result["chosen"][0]  # asked twice in one batch: the same choice and tokens
    assert result["again"] == result["chosen"][:2]  # whole prompts cached: the first token still from all of it
    assert result["chosen"][0] != result["plain"][0] or result["chosen"][1] != result["plain"][1]


def check_refusals(refused: list) -> None:
    capacity, forged = refused
    assert capacity and "speckv_capacity" in capacity and "window" in capacity and "\n" not in capacity
    assert forged and "afterburner_speckv_keep" in forged and "\n" not in forged


def expected_events(result: dict) -> list[tuple[int, int]]:
    """(prompt tokens, kept per head) of every request that asked: full capacity, then the capacity, then the
    cached pair."""
    asked = [len(ids) for ids, ask in zip(result["prompt_ids"], result["asks"], strict=True) if ask]
    expected = [(n, n) for n in asked] + [(n, CAPACITY + 1 if n > CAPACITY else n) for n in asked]
    return sorted(expected + [(n, CAPACITY + 1) for n in asked[:2]])
