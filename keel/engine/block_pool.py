"""The KV-cache block pool: free list, reference counts and the prefix cache. Torch-free.

A block whose reference count drops to zero goes to the back of the free queue but keeps its
prefix hash, so a later request with the same prefix can take it back; it loses the hash only when
it is handed out again. Free blocks are therefore reused least-recently-freed first.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict


def hash_block(parent: bytes | None, token_ids: list[int], adapter_id: int | None = None) -> bytes:
    """Hash of a full block, chained from the previous block's hash so equal hashes mean equal prefixes.

    The adapter takes part because an adapter changes the keys and values of the same tokens.
    A cryptographic hash, because a collision would silently hand one request another's cache.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else struct.pack("<q", -1 if adapter_id is None else adapter_id))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """Take n blocks from the front of the free queue, or None (and nothing taken) if too few."""
        if n > len(self.free_queue):
            return None
        ids = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            old = self.block_hash[block]
            if old is not None:
                del self.cached[old]
                self.block_hash[block] = None
            self.ref_cnt[block] = 1
            ids.append(block)
        return ids

    def free(self, block_ids: list[int]) -> None:
        # Reverse order: the tail of a sequence is the least likely to be shared, so it is evicted first.
        for block in reversed(block_ids):
            self.ref_cnt[block] -= 1
            assert self.ref_cnt[block] >= 0, f"block {block} freed twice"
            if self.ref_cnt[block] == 0:
                self.free_queue[block] = None

    def lookup_prefix(self, hashes: list[bytes]) -> list[int]:
        """Blocks holding the longest cached prefix of these block hashes (not yet referenced)."""
        if not self.enable_caching:
            return []
        hits = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks found by lookup_prefix."""
        for block in block_ids:
            if self.ref_cnt[block] == 0:
                del self.free_queue[block]
            self.ref_cnt[block] += 1

    def cache_block(self, block: int, block_hash: bytes) -> None:
        """Register a block whose tokens are all computed under its prefix hash."""
        if not self.enable_caching or self.block_hash[block] is not None:
            return
        if block_hash in self.cached:  # the same prefix computed twice: keep the first copy
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block
