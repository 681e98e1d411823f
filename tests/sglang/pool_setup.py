"""An SGLang attention backend driven by hand on real SGLang pools, RadixAttention and ForwardBatch objects,
this module doing the scheduler's part: each request's tokens go to slots in shuffled pages (no two
neighbours share a page), req_to_token rows are written as SGLang writes them, a radix-cache hit shares
the source's first pages, and freed pages are reused first. torch_native runs beside it on the same pools.

Apart from ``engine_setup``: conftest imports that before sglang may be imported (the shim goes first).
Shapes: one layer of H_Q query heads over H_KV kv heads of D; q [T, H_Q, D], k / v [T, H_KV, D].
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

H_Q, H_KV, D = 4, 2, 16


def make_runner(page_size: int, *, tokens: int, max_context_len: int, hf_config=None) -> SimpleNamespace:
    """What a backend reads from SGLang's ModelRunner, with real pools: 8 request rows of
    ``max_context_len`` slots, ``tokens`` KV slots in pages of ``page_size``."""
    return SimpleNamespace(
        device="cpu", model_config=SimpleNamespace(hf_config=hf_config),
        req_to_token_pool=ReqToTokenPool(size=8, max_context_len=max_context_len, device="cpu",
                                         enable_memory_saver=False),
        token_to_kv_pool=MHATokenToKVPool(size=tokens, page_size=page_size, dtype=torch.float32, head_num=H_KV,
                                          head_dim=D, layer_num=1, device="cpu", enable_memory_saver=False))


class PoolWorld:
    """``backend`` (built on ``runner``) and torch_native on the same pools; request ``row`` holds
    ``lens[row]`` tokens in the pages ``pages[row]``. Queries, keys and values come from one generator
    seeded with ``seed``, after the shuffle of the free pages."""

    def __init__(self, runner: SimpleNamespace, backend, page_size: int, seed: int = 0):
        self.backend, self.page_size = backend, page_size
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self.kv = runner.token_to_kv_pool
        self.stock = TorchNativeAttnBackend(runner)
        self.layer = RadixAttention(H_Q, D, D**-0.5, H_KV, layer_id=0)
        self.gen = torch.Generator().manual_seed(seed)
        pages = self.kv.size // page_size
        self.free = (torch.randperm(pages - 1, generator=self.gen) + 1).tolist()  # slot 0 is SGLang's padding
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

    def release(self, row: int, *, in_order: bool = False) -> None:
        """Free a request's pages; the next allocations reuse them first, in another order (``in_order``:
        the same order, so that a request as long puts every position in the slot it had)."""
        mine = self.pages.pop(row)
        order = range(len(mine)) if in_order else torch.randperm(len(mine), generator=self.gen).tolist()
        self.free[:0] = [mine[i] for i in order]
        del self.lens[row]

    def step(self, extend: dict[int, int], mode: ForwardMode, *, also_stock: bool = False):
        """One step in which request ``row`` adds ``extend[row]`` tokens through the backend: (q, ours,
        torch_native's on the same inputs or None), each [T, H_Q, D]."""
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
        ours = self._forward(self.backend, batch, q, k, v)
        stock = None
        if also_stock:  # writes the same K / V to the same slots again
            stock = self._forward(self.stock, batch, q, k, v).view(n, H_Q, D)
        return q.view(n, H_Q, D), ours.view(n, H_Q, D), stock

    def _forward(self, backend, batch: ForwardBatch, q, k, v):
        backend.init_forward_metadata(batch)
        forward = backend.forward_decode if batch.forward_mode == ForwardMode.DECODE else backend.forward_extend
        return forward(q, k, v, self.layer, batch)

    def sequence(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The request's keys and values in position order, from the pool: [L, H_KV, D] each."""
        slots = self.req_to_token[row, : self.lens[row]].long()
        return self.kv.get_key_buffer(0)[slots], self.kv.get_value_buffer(0)[slots]
