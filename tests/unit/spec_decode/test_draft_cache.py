"""A draft's KV cache across a request's steps (``draft_cache.DraftKV``): through steps that accept some
drafts and reject the rest, the cached draft picks the same tokens as the whole-sequence draft, its logits
agree to float32 rounding, and it reads only what is new (counted exactly); a sequence that shares nothing
with the cache is prefilled again."""

import pytest
import torch

from afterburner.spec_decode.draft.confident_chain import draft_chain
from afterburner.spec_decode.draft.draft_cache import DraftKV, last_logits
from afterburner.spec_decode.draft.draft_tree import draft_topk

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

DEPTH, TOPK = 4, 3


def test_cached_drafts_equal_whole_sequence_drafts_and_read_only_new_tokens(target_and_layer_draft):
    _, draft, prompts = target_and_layer_draft
    ids, kv = prompts[0], DraftKV()
    expected_fed = 0
    covered = torch.zeros(0, dtype=torch.long)  # what the cache should hold after each step
    for step, accepted in enumerate([0, 2, DEPTH, 1, 3]):  # drafts the "target" accepts at each step
        cached = draft_topk(draft, ids, DEPTH, TOPK, kv)
        assert torch.equal(cached, draft_topk(draft, ids, DEPTH, TOPK)), f"step {step}"
        common = 0
        while common < min(covered.numel(), ids.numel() - 1) and covered[common] == ids[common]:
            common += 1
        expected_fed += ids.numel() - common + DEPTH - 1  # the new ids, then one fed token per deeper pass
        assert kv.fed == expected_fed, f"step {step}"
        chain = cached[:, 0]
        covered = torch.cat([ids, chain[: DEPTH - 1]])
        bonus = (chain[accepted] + 1) % 1000 if accepted < DEPTH else torch.tensor(7)  # a rejected draft
        ids = torch.cat([ids, chain[:accepted], bonus.view(1)])
    assert kv.fed < sum(prompts[0].numel() + i for i in range(5)) * DEPTH  # far below re-reading everything


def test_cached_logits_agree_and_an_unrelated_sequence_is_prefilled(target_and_layer_draft):
    _, draft, prompts = target_and_layer_draft
    kv = DraftKV()
    for ids in (prompts[0], prompts[0][:-2], prompts[1], torch.cat([prompts[1], prompts[0][:3]])):
        before = kv.fed
        torch.testing.assert_close(last_logits(draft, ids, kv), last_logits(draft, ids), atol=1e-4, rtol=1e-4)
        assert kv.ids.tolist() == ids.tolist()
        assert kv.cache.get_seq_length() == ids.numel()
    # the second sequence is a prefix of the first: only its last token was fed again
    # (the cache keeps at most len - 1 ids so that the last position's logits are computed)
    assert kv.fed - before == 3


def test_a_confidence_stopped_chain_is_the_same_through_the_cache(target_and_layer_draft):
    _, draft, prompts = target_and_layer_draft
    median = torch.tensor(draft_chain(draft, prompts[0], 6, 0.0)[1]).median().item()  # a threshold that cuts
    kv, lengths = DraftKV(), set()
    for prompt in prompts:
        for threshold in (0.0, median):
            tokens, probabilities = draft_chain(draft, prompt, 6, threshold, kv)
            expected_tokens, expected = draft_chain(draft, prompt, 6, threshold)
            assert tokens == expected_tokens
            assert probabilities == pytest.approx(expected, rel=1e-4)
            lengths.add(len(tokens))
    assert len(lengths) > 1  # the threshold did cut some chains
