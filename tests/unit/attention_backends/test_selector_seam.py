"""The attention-method seam without an engine: the shared rules, the registry, and each selector through
the protocol, against the method's own functions (the reference) on a shuffled paged cache."""

from __future__ import annotations

import pytest
import torch

from afterburner.attention_backends import registry
from afterburner.attention_backends.batch_selection import count_reads, select_batch
from afterburner.attention_backends.rules import DenseGate, LayerTraits, restarted_pages, unsupported_reason
from afterburner.attention_backends.selector import KVLayout, PrefillChunk, SequenceKV
from afterburner.attention_backends.sparse import quest
from afterburner.attention_backends.squeezed import lookup
from afterburner.attention_backends.squeezed.contexts import build_calibrated_index
from afterburner.plugins.config import SparseSettings, SqueezedSettings
from support.attention import gather, make_batch


def test_layer_rule_names_every_reason_and_passes_plain_decoder_layers():
    assert unsupported_reason(LayerTraits()) is None
    assert unsupported_reason(LayerTraits(decoder=False, alibi=True)) == "not decoder self-attention"
    assert unsupported_reason(LayerTraits(sliding_window=True, soft_cap=True)) == \
        "a sliding window, logit soft-capping"


def test_dense_gate_and_the_rewrite_rule():
    gate = DenseGate.of(SparseSettings(dense_below_tokens=100, dense_layers=2))
    assert [gate.layer_is_dense(i) for i in (0, 1, 2)] == [True, True, False]
    assert gate.sequence_is_dense(99) and not gate.sequence_is_dense(100)
    # pages of 4: slots 8 (page 2, offset 0) and 20 (page 5, offset 0) restart; padding -1 is ignored
    slots = torch.tensor([8, 9, 20, 20, -1, 3, 12 + 1])
    assert restarted_pages(slots, 4) == [2, 5]
    # a prefill's many slots take the torch path: the same rule
    many = torch.randint(-1, 4000, (1000,), generator=torch.Generator().manual_seed(0))
    assert restarted_pages(many, 16) == sorted({s // 16 for s in many.tolist() if s >= 0 and s % 16 == 0})


def test_every_registered_method_makes_a_selector_that_keeps_the_protocol():
    layout = KVLayout(page_size=16, num_pages=8, num_kv_heads=2, head_dim=8)
    for name, settings in (("sparse", SparseSettings()), ("squeezed", SqueezedSettings())):
        selector = registry.make_selector(name, settings, layout)
        assert selector.granularity in ("page", "token")
        for method in ("observe_keys", "observe_prefill", "select", "counters"):
            assert callable(getattr(selector, method)), (name, method)
    with pytest.raises(KeyError, match="available"):
        registry.make_selector("nonexistent", SparseSettings(), layout)


def _sequences(table, seq_lens, k_cache, page):
    """Pages of ``page`` tokens inside the cache's blocks, as the vLLM adapter names them."""
    block_size, per_block = k_cache.shape[1], k_cache.shape[1] // page
    sequences = []
    for b, seq_len in enumerate(seq_lens.tolist()):
        n_pages = -(-seq_len // page)
        blocks = table[b, : -(-n_pages // per_block)].long()
        pages = (blocks[:, None] * per_block + torch.arange(per_block)).flatten()[:n_pages]
        sequences.append(SequenceKV(pages, seq_len, lambda p, b=b: int(table[b, p // block_size]) * block_size
                                    + p % block_size, lambda n, b=b: gather(k_cache, table[b], n)))
    return sequences


@pytest.mark.parametrize("page", [8, 16])
def test_quest_selector_through_the_seam_is_quest(page):
    block_size, hkv = 16, 2
    query, k_cache, _, table, seq_lens, _ = make_batch(3, seq_lens=[200, 37, 129], q_lens=[1, 1, 1],
                                                       block_size=block_size, num_heads=4, num_kv_heads=hkv,
                                                       head_dim=8)
    settings = SparseSettings(budget_ratio=0.25, page_size=page, dense_below_tokens=64)
    layout = KVLayout(page, k_cache.shape[0] * block_size // page, hkv, 8)
    selector = registry.make_selector("sparse", settings, layout)
    all_slots = torch.arange(k_cache.shape[0] * block_size)
    selector.observe_keys(5, k_cache.flatten(0, 1), all_slots)  # the whole cache written once
    sequences = _sequences(table, seq_lens, k_cache, page)
    mask = select_batch(selector, DenseGate.of(settings), layer=5, query=query, sequences=sequences,
                        page_size=page, num_kv_heads=hkv, scale=8 ** -0.5)
    kmin, kmax = quest.empty_summaries(layout.num_pages, hkv, 8)
    quest.update_summaries(kmin, kmax, k_cache.flatten(0, 1), all_slots, page)
    for b, seq in enumerate(sequences):
        if seq.seq_len < 64:  # the gate keeps it dense
            assert mask[b, :, : seq.seq_len].all() and not mask[b, :, seq.seq_len:].any()
            continue
        pages = quest.choose_pages(query[b : b + 1], kmin, kmax, seq.pages, seq_len=seq.seq_len, page_size=page,
                                   budget_ratio=0.25, token_budget=None, sink_pages=1, recent_pages=2)
        assert torch.equal(mask[b, :, : seq.seq_len], pages.repeat_interleave(page, 1)[:, : seq.seq_len])
        assert not pages.all()
    counts = count_reads(mask, seq_lens.tolist(), page)
    expected_pages = sum(int(mask[b, :, : n].view(hkv, -1, page).any(-1).sum()) if n % page == 0 else
                         int(torch.nn.functional.pad(mask[b, :, :n], (0, -n % page)).view(hkv, -1, page).any(-1).sum())
                         for b, n in enumerate(seq_lens.tolist()))
    assert counts.pages_read == expected_pages < counts.pages_in_context
    assert counts.tokens_read == int(mask.sum()) and counts.tokens_in_context == int(seq_lens.sum()) * hkv


def test_squeezed_selector_builds_calibrates_reuses_and_forgets():
    block_size, hkv, dim = 16, 2, 8
    seq_len, window = 160, 8
    query, k_cache, _, table, seq_lens, _ = make_batch(5, seq_lens=[seq_len], q_lens=[window + 1],
                                                       block_size=block_size, num_heads=4, num_kv_heads=hkv,
                                                       head_dim=dim)
    settings = SqueezedSettings(observation_window=window, dense_below_tokens=64, sink_tokens=4,
                                centroid_ratio=0.1)
    layout = KVLayout(block_size, k_cache.shape[0], hkv, dim)
    selector = registry.make_selector("squeezed", settings, layout)
    end = seq_len - 2  # the prompt: every position but the decoded one
    last_page = int(table[0, end // block_size])
    selector.observe_prefill(0, query[:window], [PrefillChunk(last_page, end, window, window)])
    seq = _sequences(table, seq_lens, k_cache, block_size)[0]
    decode = query[window:]
    chosen = selector.select(0, decode, seq, scale=dim ** -0.5)
    fixed = end // block_size * block_size  # the prompt's full pages before its last token's
    index = build_calibrated_index(settings, gather(k_cache, table[0], fixed), query[:window], scale=dim ** -0.5)
    expected = lookup.extend_to_sequence(lookup.select_tokens(index, decode, scale=dim ** -0.5), seq_len)
    assert torch.equal(chosen, expected) and not chosen.all()
    assert selector.counters() == {"indexes_built": 1, "index_hits": 0, "index_builds_deferred": 0,
                                   "block_layouts_built": 0}
    assert torch.equal(selector.select(0, decode, seq, scale=dim ** -0.5), expected)
    assert selector.counters() == {"indexes_built": 1, "index_hits": 1, "index_builds_deferred": 0,
                                   "block_layouts_built": 0}
    # the context's first page written again from offset 0: its index is gone, the sequence reads all
    selector.observe_keys(0, k_cache[0, :1], torch.tensor([int(table[0, 0]) * block_size]))
    assert selector.select(0, decode, seq, scale=dim ** -0.5).all()


def test_squeezed_builds_at_most_its_budget_per_step_and_the_rest_wait():
    """``index_builds_per_step``: once a step's builds are spent, a layer whose index is missing reads every
    key and keeps its window; the next step builds it. Without ``begin_step`` (adapters that do not know
    steps) nothing is bounded."""
    block_size, hkv, dim, seq_len, window = 16, 2, 8, 160, 8
    query, k_cache, _, table, seq_lens, _ = make_batch(6, seq_lens=[seq_len], q_lens=[window + 1],
                                                       block_size=block_size, num_heads=4, num_kv_heads=hkv,
                                                       head_dim=dim)
    settings = SqueezedSettings(observation_window=window, dense_below_tokens=64, sink_tokens=4,
                                centroid_ratio=0.1, index_builds_per_step=2)
    selector = registry.make_selector("squeezed", settings, KVLayout(block_size, k_cache.shape[0], hkv, dim))
    end, layers = seq_len - 2, range(3)
    last_page = int(table[0, end // block_size])
    for layer in layers:
        selector.observe_prefill(layer, query[:window], [PrefillChunk(last_page, end, window, window)])
    seq = _sequences(table, seq_lens, k_cache, block_size)[0]
    decode, scale = query[window:], dim ** -0.5
    selector.begin_step()
    first = [selector.select(layer, decode, seq, scale=scale) for layer in layers]
    assert [bool(mask.all()) for mask in first] == [False, False, True], "the third layer waits"
    assert selector.counters()["indexes_built"] == 2 and selector.counters()["index_builds_deferred"] == 1
    selector.begin_step()
    second = [selector.select(layer, decode, seq, scale=scale) for layer in layers]
    assert not second[2].all() and torch.equal(second[0], first[0])
    assert selector.counters() == {"indexes_built": 3, "index_hits": 2, "index_builds_deferred": 1,
                                   "block_layouts_built": 0}
    unbounded = registry.make_selector("squeezed", settings, KVLayout(block_size, k_cache.shape[0], hkv, dim))
    for layer in layers:
        unbounded.observe_prefill(layer, query[:window], [PrefillChunk(last_page, end, window, window)])
        assert not unbounded.select(layer, decode, seq, scale=scale).all()
    assert unbounded.counters()["indexes_built"] == 3


def test_a_per_request_batch_reads_everything_of_rows_whose_request_brought_no_choice():
    """SpecKV's selector chooses from what a request carries (prompt entries per layer and kv head, then every
    generated token); a batch row without a choice reads all of its sequence and never reaches the selector."""
    from afterburner.plugins.config import SpecKVSettings

    hkv, prompt = 2, 6
    settings = SpecKVSettings()
    selector = registry.make_selector("speckv", settings, KVLayout(page_size=1, num_pages=64, num_kv_heads=hkv,
                                                                   head_dim=4))
    keep = torch.rand(3, hkv, prompt, generator=torch.Generator().manual_seed(0)) < 0.5
    sequences = [SequenceKV(pages=torch.arange(n), seq_len=n, slot_of=int, read_keys=None, request=request)
                 for n, request in ((prompt + 3, keep), (5, None))]
    mask = select_batch(selector, DenseGate.of(settings), layer=1, query=torch.zeros(2, 4, 4), sequences=sequences,
                        page_size=1, num_kv_heads=hkv, scale=1.0, per_request=True)
    assert torch.equal(mask[0, :, :prompt], keep[1]) and mask[0, :, prompt:].all()
    assert mask[1, :, :5].all() and not mask[1, :, 5:].any()
    assert selector.counters() == {"speckv_selections": 1}
    with pytest.raises(ValueError, match="only for requests that carry"):  # without the flag the gate passes it on
        select_batch(selector, DenseGate.of(settings), layer=1, query=torch.zeros(2, 4, 4), sequences=sequences,
                     page_size=1, num_kv_heads=hkv, scale=1.0)
