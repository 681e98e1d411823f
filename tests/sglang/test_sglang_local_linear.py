"""``--attention-backend afterburner-local-linear`` on the real sglang modules: the parser accepts it and
the factory builds it (the model's own lambda before the config's); run by hand on real SGLang pools and
ForwardBatch objects (shuffled slots, a radix-shared prefix, chunked prefill, a mixed step, decode) every
step's output is ``local_linear_paged`` on each request's keys and values in position order, it is
local-linear attention (float64 reference), and at a huge lambda it is SGLang's own softmax output; a real
CPU Engine with it at a huge lambda gives torch_native's greedy tokens, and at a small one other tokens."""

import json
from types import SimpleNamespace

import pytest
import torch
from engine_setup import GREEDY, LONG_PROMPTS, MAX_NEW_TOKENS, MIXED_PROMPTS, engine_run
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from afterburner.attention_backends.local_linear.method import MODEL_LAMBDA_KEY
from afterburner.attention_backends.local_linear.paged import local_linear_paged
from afterburner.attention_backends.local_linear.reference import local_linear_reference
from afterburner.plugins import stats
from afterburner.plugins.config import AfterburnerConfig, ConfigError
from afterburner.plugins.sglang import attention
from afterburner.plugins.sglang.output_backend import OutputAttnBackend

pytestmark = pytest.mark.sglang

NAME = "afterburner-local-linear"
H_Q, H_KV, D = 4, 2, 16


def _runner(page_size: int, hf_config=None):
    """What the backend reads from SGLang's ModelRunner, with real pools."""
    return SimpleNamespace(
        device="cpu", model_config=SimpleNamespace(hf_config=hf_config),
        req_to_token_pool=ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False),
        token_to_kv_pool=MHATokenToKVPool(size=1024, page_size=page_size, dtype=torch.float32, head_num=H_KV,
                                          head_dim=D, layer_num=1, device="cpu", enable_memory_saver=False))


def _backend(monkeypatch, lam: float, page_size: int = 1, hf_config=None) -> OutputAttnBackend:
    monkeypatch.setenv("AFTERBURNER_CONFIG", json.dumps({"attention": {"local_linear": {"lam": lam}}}))
    return attention._create(_runner(page_size, hf_config), name=NAME)


def test_real_parser_accepts_the_backend_and_the_factory_builds_it(monkeypatch):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    args = prepare_server_args(["--model-path", "unused", "--device", "cpu", "--attention-backend", NAME])
    assert args.attention_backend == NAME
    attention.check_flags(args, AfterburnerConfig())
    backend = _backend(monkeypatch, lam=3.0)
    assert isinstance(backend, OutputAttnBackend) and backend.op.lam_of(0) == 3.0
    own = _backend(monkeypatch, lam=3.0, hf_config=SimpleNamespace(num_hidden_layers=1, **{MODEL_LAMBDA_KEY: [0.25]}))
    assert own.op.lam_of(0) == 0.25
    with pytest.raises(ConfigError, match=f"--attention-backend {NAME}: {MODEL_LAMBDA_KEY}"):
        _backend(monkeypatch, lam=3.0, hf_config=SimpleNamespace(num_hidden_layers=2, **{MODEL_LAMBDA_KEY: [1.0]}))


class World:
    """Real pools, RadixAttention and ForwardBatch objects; this class does the scheduler's part (slots in
    shuffled pages, req_to_token writes)."""

    def __init__(self, backend: OutputAttnBackend, page_size: int, seed: int = 0):
        self.backend, self.page_size = backend, page_size
        self.req_to_token = backend.req_to_token_pool.req_to_token
        self.kv = backend.token_to_kv_pool
        self.stock = TorchNativeAttnBackend(SimpleNamespace(  # the same pools, SGLang's softmax
            device="cpu", req_to_token_pool=backend.req_to_token_pool, token_to_kv_pool=self.kv))
        self.layer = RadixAttention(H_Q, D, D**-0.5, H_KV, layer_id=0)
        self.gen = torch.Generator().manual_seed(seed)
        self.free = (torch.randperm(1024 // page_size - 1, generator=self.gen) + 1).tolist()  # slot 0: padding
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def _place(self, row: int, position: int) -> int:
        if position % self.page_size == 0:
            self.pages[row].append(self.free.pop(0))
        slot = self.pages[row][position // self.page_size] * self.page_size + position % self.page_size
        self.req_to_token[row, position] = slot
        return slot

    def share(self, row: int, source: int, tokens: int) -> None:
        """A radix-cache hit: ``row`` starts with ``source``'s first ``tokens`` (a whole number of pages)."""
        self.pages[row] = self.pages[source][: tokens // self.page_size]
        self.req_to_token[row, :tokens] = self.req_to_token[source, :tokens]
        self.lens[row] = tokens

    def step(self, extend: dict[int, int], mode: ForwardMode, *, also_stock: bool = False):
        """One step in which request ``row`` adds ``extend[row]`` tokens: (q [T, Hq, D], ours, stock or None)."""
        rows = list(extend)
        prefix = [self.lens.setdefault(row, 0) for row in rows]
        for row in rows:
            self.pages.setdefault(row, [])
        slots = [self._place(row, p) for row, start in zip(rows, prefix, strict=True)
                 for p in range(start, start + extend[row])]
        for row in rows:
            self.lens[row] += extend[row]
        n, seq_lens = len(slots), torch.tensor([self.lens[row] for row in rows])
        counts = [extend[row] for row in rows]
        fields = dict(forward_mode=mode, batch_size=len(rows), input_ids=torch.zeros(n, dtype=torch.long),
                      req_pool_indices=torch.tensor(rows), seq_lens=seq_lens, out_cache_loc=torch.tensor(slots),
                      seq_lens_sum=int(seq_lens.sum()), seq_lens_cpu=seq_lens)
        if mode != ForwardMode.DECODE:
            fields.update(extend_prefix_lens=torch.tensor(prefix), extend_seq_lens=torch.tensor(counts),
                          extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=counts)
        batch = ForwardBatch(**fields)
        q, k, v = (torch.randn(n, h * D, generator=self.gen) for h in (H_Q, H_KV, H_KV))
        k, v = k.view(n, H_KV, D), v.view(n, H_KV, D)
        forward = self.backend.forward_decode if mode == ForwardMode.DECODE else self.backend.forward_extend
        self.backend.init_forward_metadata(batch)
        ours = forward(q, k, v, self.layer, batch)
        stock = None
        if also_stock:  # writes the same K / V to the same slots again
            self.stock.init_forward_metadata(batch)
            stock_forward = self.stock.forward_decode if mode == ForwardMode.DECODE else self.stock.forward_extend
            stock = stock_forward(q, k, v, self.layer, batch)
        return q.view(n, H_Q, D), ours.view(n, H_Q, D), stock

    def sequence(self, row: int):
        """The request's keys and values in position order, from the pool: [L, Hkv, D] each."""
        slots = self.req_to_token[row, : self.lens[row]].long()
        return self.kv.get_key_buffer(0)[slots], self.kv.get_value_buffer(0)[slots]

    def expected(self, rows: list[int], counts: list[int], q: torch.Tensor, lam: float, *, reference=False):
        """Each request's outputs computed on its own contiguous keys (one slot per block, in order)."""
        out, start = [], 0
        for row, n in zip(rows, counts, strict=True):
            keys, values = self.sequence(row)
            if reference:
                out.append(local_linear_reference(q[start:start + n], keys, values, scale=D**-0.5, lam=lam).float())
            else:
                length = keys.shape[0]
                out.append(local_linear_paged(q[start:start + n], keys.unsqueeze(1), values.unsqueeze(1),
                                              torch.arange(length)[None], torch.tensor([length]),
                                              torch.tensor([0, n]), scale=D**-0.5, lam=lam))
            start += n
        return torch.cat(out)


# A long, chunked prefill; a request sharing A's first 32 tokens (radix hit); a mixed step (A decodes one
# token beside C's prefill); then decode steps of all three.
STEPS = [({1: 40}, ForwardMode.EXTEND), ({1: 25, 2: 7}, ForwardMode.EXTEND), ("share", None),
         ({3: 20, 1: 1}, ForwardMode.MIXED), ({1: 1, 2: 1, 3: 1}, ForwardMode.DECODE),
         ({1: 1, 2: 1, 3: 1}, ForwardMode.DECODE)]


@pytest.mark.parametrize("page_size", [1, 4])
def test_every_step_is_local_linear_over_the_pool(monkeypatch, page_size):
    lam = 0.5
    world = World(_backend(monkeypatch, lam=lam, page_size=page_size), page_size)
    calls = stats.attention("local_linear").forward_calls
    for extend, mode in STEPS:
        if extend == "share":
            world.share(3, source=1, tokens=32)
            continue
        q, ours, _ = world.step(extend, mode)
        rows, counts = list(extend), list(extend.values())
        torch.testing.assert_close(ours, world.expected(rows, counts, q, lam), rtol=1e-6, atol=1e-6)
        reference = world.expected(rows, counts, q, lam, reference=True)
        torch.testing.assert_close(ours, reference, rtol=2e-3, atol=2e-3)
    assert stats.attention("local_linear").forward_calls - calls == len(STEPS) - 1


def test_a_huge_lambda_is_sglangs_softmax(monkeypatch):
    world = World(_backend(monkeypatch, lam=1e9, page_size=4), page_size=4)
    for extend, mode in STEPS:
        if extend == "share":
            world.share(3, source=1, tokens=32)
            continue
        if mode == ForwardMode.MIXED:  # torch_native takes it as an extend
            mode = ForwardMode.EXTEND
        _, ours, stock = world.step(extend, mode, also_stock=True)
        torch.testing.assert_close(ours, stock.view_as(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_engine_with_a_huge_lambda_gives_the_stock_tokens(engine, tiny_model, tmp_path):
    """The session engine runs SGLang's torch_native: the reference."""
    dense = [out["output_ids"] for out in engine[0].generate(MIXED_PROMPTS, dict(GREEDY))]
    huge = engine_run(tiny_model, "local-linear", {"attention": {"local_linear": {"lam": 1e9}}}, tmp_path / "huge")
    assert huge["mixed"] == dense
    assert huge["after_mixed"]["forward_calls"] > 0
    assert huge["after_long"]["forward_calls"] > huge["after_mixed"]["forward_calls"]
    assert [len(ids) for ids in huge["long"]] == [MAX_NEW_TOKENS] * len(LONG_PROMPTS)
    small = engine_run(tiny_model, "local-linear", {"attention": {"local_linear": {"lam": 0.05}}}, tmp_path / "small")
    assert small["mixed"] != dense, "a small lambda must change what the model computes"
