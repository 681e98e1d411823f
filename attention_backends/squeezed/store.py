"""A bounded store of Squeezed Attention indexes, engine-free: (fixed context, layer) -> SqueezedIndex.

A fixed context is named by the KV blocks that hold it, in order (block hashes where the engine has
them, since prefix caching keeps them stable across requests; else physical block ids). The store evicts
least recently used entries to stay within ``max_bytes`` (the indexes' tensor bytes), and the adapter calls
``drop_blocks`` when the engine frees or overwrites blocks, so an index never outlives the keys it
describes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from .index import SqueezedIndex

ContextKey = tuple[Hashable, ...]  # the fixed context's blocks, in order


class FixedContextStore:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[ContextKey, int], SqueezedIndex] = OrderedDict()  # oldest first
        self._users: dict[Hashable, set[tuple[ContextKey, int]]] = {}  # block -> entries that use it

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: tuple[ContextKey, int]) -> bool:
        return entry in self._entries

    def get(self, blocks: ContextKey, layer: int) -> SqueezedIndex | None:
        """The index of this context and layer (now the most recently used), or None."""
        entry = (tuple(blocks), layer)
        index = self._entries.get(entry)
        if index is not None:
            self._entries.move_to_end(entry)
        return index

    def put(self, blocks: ContextKey, layer: int, index: SqueezedIndex) -> bool:
        """Store (replacing any older index of the same entry), evicting the least recently used entries
        as needed; an index larger than the whole bound is not stored (returns False)."""
        entry = (tuple(blocks), layer)
        self._remove(entry)
        if index.nbytes > self.max_bytes:
            return False
        while self.nbytes + index.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
        self._entries[entry] = index
        self.nbytes += index.nbytes
        for block in entry[0]:
            self._users.setdefault(block, set()).add(entry)
        return True

    def drop_blocks(self, ids: Iterable[Hashable]) -> int:
        """Drop every entry whose context uses any of these blocks; returns how many were dropped."""
        doomed = set().union(*(self._users.get(block, ()) for block in ids))
        for entry in doomed:
            self._remove(entry)
        return len(doomed)

    def _remove(self, entry: tuple[ContextKey, int]) -> None:
        index = self._entries.pop(entry, None)
        if index is None:
            return
        self.nbytes -= index.nbytes
        for block in entry[0]:
            users = self._users[block]
            users.discard(entry)
            if not users:
                del self._users[block]
