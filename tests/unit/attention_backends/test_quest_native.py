"""The C hot path of Quest on CPU (``sparse/quest_native``) against the torch path it replaces: the same
blocks chosen for a decode batch (``block_choice``) and the same summaries after writes (``quest``)."""

import ctypes

import pytest
import torch

from afterburner.attention_backends import native
from afterburner.attention_backends.selector import KVLayout
from afterburner.attention_backends.sparse import block_choice, quest, quest_native
from afterburner.attention_backends.sparse.selector import QuestSelector
from afterburner.plugins.config import SparseSettings

lib = quest_native.library()
pytestmark = pytest.mark.skipif(not isinstance(lib, ctypes.CDLL), reason=f"no native library: {lib}")


def _torch_choice(bounds, query, table, seq_lens, budgets, min_recent, *, block_size, page, sink, recent, k,
                  max_blocks):
    scores = block_choice.block_scores(query, bounds, table, seq_lens, block_size=block_size, page_size=page,
                                       max_blocks=max_blocks)
    n_blocks = torch.div(seq_lens.long() + block_size - 1, block_size, rounding_mode="floor")
    return block_choice.choose_blocks(scores, n_blocks, budgets, k=k, sink=sink,
                                      recent=min_recent.clamp(min=recent))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("page", "group", "head_dim"), [(16, 3, 64), (8, 1, 16), (32, 4, 32), (16, 2, 128)])
def test_native_choice_equals_the_torch_path(seed, page, group, head_dim, dtype):
    g = torch.Generator().manual_seed(seed)
    block_size, num_kv_heads, num_blocks = 32, 3, 96
    keys = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=g)
    kmin, kmax = quest.empty_summaries(num_blocks * block_size // page, num_kv_heads, head_dim, dtype=dtype)
    # every block written except the last few: their pages stay empty (+-inf) and must score -inf
    quest.update_summaries(kmin, kmax, keys[:-3 * block_size], torch.arange((num_blocks - 3) * block_size), page)
    bounds = block_choice.stack_bounds(kmin, kmax).contiguous()
    seq_lens = torch.tensor([1000, 333, 64, 2100, 40, 1500], dtype=torch.int32)
    table = torch.stack([torch.randperm(num_blocks, generator=g)[:80] for _ in seq_lens]).int()
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=g)
    sink, recent = 1, 2
    budgets = torch.tensor(block_choice.budgets_for(seq_lens.tolist(), block_size=block_size, budget_ratio=0.2,
                                                    token_budget=None, sink=sink, recent=recent)) + 1
    n_blocks = (seq_lens.long() + block_size - 1) // block_size
    budgets = torch.minimum(budgets, n_blocks)
    min_recent = torch.tensor([1, 3, 1, 2, 1, 1])
    max_blocks, k = int(n_blocks.max()), int(budgets.max())
    kwargs = dict(block_size=block_size, sink=sink, recent=recent, k=k, max_blocks=max_blocks)
    expected = _torch_choice(bounds, query, table, seq_lens, budgets, min_recent, page=page, **kwargs)
    got = quest_native.select_blocks(lib, bounds, query, table, seq_lens, budgets, min_recent, page_size=page,
                                     **kwargs)
    assert got.dtype == torch.int64 and got.shape == expected.shape
    for b in range(len(seq_lens)):
        valid = int(budgets[b])
        assert torch.equal(got[b, :, :valid], expected[b, :, :valid]), b
        assert (got[b, :, valid:] == 0).all()
    ids = quest_native.select_blocks(lib, bounds, query, table, seq_lens, budgets, min_recent, page_size=page,
                                     head_ids=True, **kwargs)
    assert ids.dtype == torch.int32 and torch.equal(ids, block_choice.head_block_ids(table, got, num_kv_heads))


def test_native_choice_breaks_with_a_wrong_score():
    """The comparison above can fail: negating the query picks other blocks."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(64 * 32, 1, 16, generator=g)
    kmin, kmax = quest.empty_summaries(64 * 2, 1, 16)
    quest.update_summaries(kmin, kmax, keys, torch.arange(64 * 32), 16)
    bounds = block_choice.stack_bounds(kmin, kmax).contiguous()
    args = (torch.arange(64, dtype=torch.int32)[None], torch.tensor([2048], dtype=torch.int32), torch.tensor([8]),
            None)
    query = torch.randn(1, 1, 16, generator=g)
    kwargs = dict(block_size=32, page_size=16, sink=1, recent=1, k=8, max_blocks=64)
    assert not torch.equal(quest_native.select_blocks(lib, bounds, query, *args, **kwargs),
                           quest_native.select_blocks(lib, bounds, -query, *args, **kwargs))


def test_a_sequence_longer_than_max_blocks_is_refused_not_overrun():
    bounds = block_choice.stack_bounds(*quest.empty_summaries(64, 1, 8)).contiguous()
    with pytest.raises(ValueError, match="more blocks than max_blocks=4"):
        quest_native.select_blocks(lib, bounds, torch.randn(1, 1, 8), torch.arange(8, dtype=torch.int32)[None],
                                   torch.tensor([8 * 32], dtype=torch.int32), torch.tensor([2]), None,
                                   block_size=32, page_size=16, sink=1, recent=1, k=2, max_blocks=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_native_updates_equal_the_torch_updates(seed, dtype):
    """Prefill then decode writes, a reused page (offset 0 written again) and padding slots (-1); bfloat16
    tables bit for bit (both round outward)."""
    g = torch.Generator().manual_seed(seed)
    page, num_pages, num_kv_heads, head_dim = 16, 40, 3, 64
    kmin, kmax = quest.empty_summaries(num_pages, num_kv_heads, head_dim, dtype=dtype)
    bounds = block_choice.stack_bounds(kmin, kmax).contiguous()
    writes = [torch.arange(0, 200), torch.tensor([200, 201, -1, 330]), torch.arange(32, 40),  # page 2 reused
              torch.tensor([-1, -1]), torch.randperm(num_pages * page, generator=g)[:50]]
    for slots in writes:
        keys = torch.randn(slots.shape[0], num_kv_heads, head_dim, generator=g)
        quest.update_summaries(kmin, kmax, keys, slots, page)
        quest_native.update_bounds(lib, bounds, keys, slots, page)
    assert torch.equal(bounds, block_choice.stack_bounds(kmin, kmax))


def test_bfloat16_summaries_halve_the_table_and_stay_upper_bounds():
    """The selector stores bfloat16 rows when asked; every stored max is >= and every min <= the keys of its
    page (round-to-nearest would break that for about half the values), within one bfloat16 step."""
    g = torch.Generator().manual_seed(3)
    settings = SparseSettings(page_size=8, budget_ratio=0.25, summary_dtype="bfloat16")
    selector = QuestSelector(settings, KVLayout(8, 64, 2, 16))
    keys = torch.randn(64 * 8, 2, 16, generator=g) * 3
    selector.observe_keys(0, keys, torch.arange(64 * 8))
    bounds = selector.bounds(0)
    assert bounds.dtype == torch.bfloat16 and bounds.element_size() == 2
    pages = keys.view(64, 8, 2, 16)
    kmax, kmin = bounds[..., :16].float(), bounds[..., 16:].float()
    true_max, true_min = pages.amax(1), pages.amin(1)
    assert (kmax >= true_max).all() and (kmin <= true_min).all()
    step = true_max.abs().clamp(min=1e-30) * 2.0 ** -7
    assert (kmax - true_max <= step).all() and (true_min - kmin <= true_min.abs() * 2.0 ** -7).all()
    assert not (true_max.to(torch.bfloat16).float() >= true_max).all()  # rounding to nearest would not bound


def test_the_selector_takes_the_native_path_and_counts_none_on_torch():
    selector = QuestSelector(SparseSettings(page_size=16, budget_ratio=0.25), KVLayout(16, 64, 1, 8))
    selector.observe_keys(0, torch.randn(32 * 32, 1, 8), torch.arange(32 * 32))
    chosen = selector.select_blocks(0, torch.randn(1, 2, 8), torch.arange(32, dtype=torch.int32)[None],
                                    torch.tensor([1024], dtype=torch.int32), torch.tensor([8]), block_size=32, k=8,
                                    max_blocks=32)
    assert chosen.shape == (1, 1, 8) and chosen[0, 0, 0] == 0 and chosen[0, 0, -1] == 31  # sink, recent
    assert selector.counters() == {}


def test_without_the_library_the_torch_path_runs_and_is_counted(monkeypatch, caplog):
    monkeypatch.setattr(quest_native, "library", lambda: native.NativeUnavailable("no C compiler (test)"))
    selector = QuestSelector(SparseSettings(page_size=16, budget_ratio=0.25), KVLayout(16, 64, 1, 8))
    assert "no C compiler (test)" in caplog.text
    selector.observe_keys(0, torch.randn(32 * 32, 1, 8), torch.arange(32 * 32))
    selector.select_blocks(0, torch.randn(1, 2, 8), torch.arange(32, dtype=torch.int32)[None],
                           torch.tensor([1024], dtype=torch.int32), torch.tensor([8]), block_size=32, k=8,
                           max_blocks=32)
    assert selector.counters() == {"torch_path_calls": 1}


def test_build_says_why_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("AFTERBURNER_CACHE", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native.build(quest_native._SOURCE)


def test_build_caches_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("AFTERBURNER_CACHE", str(tmp_path))
    first = native.build(quest_native._SOURCE)
    assert first.exists() and native.build(quest_native._SOURCE) == first
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : another-cpu")
    assert native.build(quest_native._SOURCE) != first

