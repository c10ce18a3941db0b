"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, automatic prefix caching.

A full block is identified by the SHA-256 of its tokens chained with the hash of the block before it,
so equal hashes mean equal prefixes; the chain starts from the request's `cache_salt` (vLLM's field),
so that requests with different salts (tenants) never share blocks. A collision-resistant hash, not
Python's `hash` of a tuple: a crafted prompt must not be able to collide with another tenant's prefix
and read its KV (vLLM CVE-2025-25183, fixed there by the same change). Blocks are refcounted; a block whose count drops to zero goes to the
back of the free queue but keeps its hash, so a later request with the same prefix can take it back
(a hit) until the allocator reuses it for something else (LRU eviction: reuse takes from the front).
A block is registered in the prefix cache only once its K/V have been computed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from shoal.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


def root_hash(cache_salt: str | None) -> bytes:
    """The parent hash of a sequence's first block: empty, or the SHA-256 of its cache salt."""
    return hashlib.sha256(b"salt:" + cache_salt.encode()).digest() if cache_salt else b""


def chain_hash(prev: bytes, token_ids: tuple[int, ...]) -> bytes:
    """SHA-256 over the parent block's hash and this block's token ids (int64, native byte order), 32 bytes."""
    return hashlib.sha256(prev + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evict: its old contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> None:
        """On first admission: take every cached full block of the prompt, and count them computed.

        The last prompt token is always recomputed (its logits are needed), so a prompt cached entirely
        leaves its last block to be computed afresh; we never write into a shared block.
        """
        if (
            not self.enable_prefix_caching
            or seq.block_table
            or seq.params.prompt_logprobs is not None
            or seq.captured_logits is not None
        ):
            return
        bs = self.block_size
        num_full = (len(seq) - 1) // bs
        prev = root_hash(seq.cache_salt)
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(prev, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._acquire(block_id)
            seq.block_table.append(block_id)
            prev = h
        seq.num_computed = len(seq.block_table) * bs

    def count_admission(self, seq: Sequence) -> None:
        """Prefix-cache counters, taken once a sequence is really admitted (not at every retry)."""
        if seq.num_output_tokens == 0:  # a preempted sequence also matches its generated tokens
            seq.num_cached_prompt_tokens = seq.num_computed
        self.prefix_queries += len(seq)
        self.prefix_hits += seq.num_computed

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give seq room for num_new_tokens more tokens; False (and nothing taken) if blocks run out."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free:
            return False
        seq.block_table.extend(self._take_free() for _ in range(needed))
        return True

    def register_computed(self, seq: Sequence, old_num_computed: int) -> None:
        """After a step: full blocks that just got their K/V become findable by later prompts."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(old_num_computed // bs, seq.num_computed // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            prev = self.blocks[seq.block_table[i - 1]].hash if i else root_hash(seq.cache_salt)
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block.hash, block.token_ids = chain_hash(prev, tokens), tokens
            self.cached.setdefault(block.hash, block.block_id)

    def free_sequence(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # tail blocks are the least reusable: evict them first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # nothing to keep: reuse first
                else:
                    self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0
