"""Paged KV cache: a torch-free block manager (accounting) and the tensor pool it indexes.

Admission reserves a request's worst case (prompt + max_tokens + one block of draft slack) up front, so a
running request can always get the blocks it grows into: the engine never runs out of KV mid-request.
Blocks are handed out lazily from that reservation; rollback of rejected draft tokens frees the blocks
past the committed length and returns them to the reservation.
The drafter's context K/V use the same block ids (same positions), in a pool of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass
class SeqBlocks:
    table: list[int] = field(default_factory=list)  # block ids, position p lives in table[p // block_size]
    reserved: int = 0  # blocks promised to this sequence (worst case), len(table) <= reserved
    home: int | None = None  # first block of a contiguous run of ``reserved`` blocks held for it (else scattered)


class BlockManager:
    """Torch-free accounting of a pool of ``num_blocks`` blocks of ``block_size`` tokens.

    A new sequence gets its whole worst case as one contiguous run of blocks when the pool has such a run
    (first fit): its K/V then sit in consecutive cache slots and attention reads them as a view, no gather.
    When the pool is too fragmented, its blocks come one by one from anywhere (lazily, out of the reservation)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = bytearray(b"\x01") * num_blocks  # 1 = free (not in a table, not in a home run)
        self._num_free = num_blocks
        self._seqs: dict[str, SeqBlocks] = {}
        self._reserved_unallocated = 0  # promised to scattered sequences but still free

    # ---- accounting ----
    @property
    def num_free_blocks(self) -> int:
        """Blocks neither in use nor promised to an admitted sequence."""
        return self._num_free - self._reserved_unallocated

    @property
    def free_tokens(self) -> int:
        return self.num_free_blocks * self.block_size

    @property
    def total_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_reserve(self, num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) <= self.num_free_blocks

    def _take(self, start: int, n: int) -> None:
        self._free[start: start + n] = bytes(n)
        self._num_free -= n

    def _give(self, ids) -> None:
        for b in ids:
            self._free[b] = 1
            self._num_free += 1

    # ---- lifecycle ----
    def reserve(self, seq_id: str, num_tokens: int) -> None:
        """Promise room for ``num_tokens`` tokens to a new sequence; raises MemoryError if it does not fit."""
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already holds a reservation")
        need = blocks_for(num_tokens, self.block_size)
        if need > self.num_free_blocks:
            raise MemoryError(f"need {need} KV blocks, {self.num_free_blocks} free")
        s = SeqBlocks(reserved=need)
        start = self._free.find(b"\x01" * need) if need else -1  # first fit (need <= num_free_blocks: it fits)
        if start >= 0:
            self._take(start, need)
            s.home = start
        else:
            self._reserved_unallocated += need
        self._seqs[seq_id] = s

    def ensure(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the sequence's table to hold ``num_tokens`` positions (within its reservation)."""
        s = self._seqs[seq_id]
        need = blocks_for(num_tokens, self.block_size)
        if need > s.reserved:
            raise MemoryError(f"sequence {seq_id!r} needs {need} blocks, reserved {s.reserved}")
        while len(s.table) < need:
            if s.home is not None:
                s.table.append(s.home + len(s.table))
            else:
                b = self._free.find(1)
                self._take(b, 1)
                self._reserved_unallocated -= 1
                s.table.append(b)
        return s.table

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Roll back to ``num_tokens`` valid positions: blocks past them go back to the reservation."""
        s = self._seqs[seq_id]
        keep = blocks_for(num_tokens, self.block_size)
        while len(s.table) > keep:
            b = s.table.pop()
            if s.home is None:  # a home run keeps its blocks
                self._give([b])
                self._reserved_unallocated += 1

    def free(self, seq_id: str) -> None:
        s = self._seqs.pop(seq_id, None)
        if s is None:
            return
        if s.home is not None:
            self._give(range(s.home, s.home + s.reserved))
        else:
            self._reserved_unallocated -= s.reserved - len(s.table)
            self._give(s.table)

    def table(self, seq_id: str) -> list[int]:
        return self._seqs[seq_id].table

    def contiguous(self, seq_id: str) -> bool:
        """The sequence's blocks are one run (its cache slots are consecutive)."""
        return self._seqs[seq_id].home is not None

    def slot(self, seq_id: str, position: int) -> int:
        t = self._seqs[seq_id].table
        return t[position // self.block_size] * self.block_size + position % self.block_size

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs


def kv_bytes_per_block(block_size: int, layers: list[tuple[int, int]], elem_size: int) -> int:
    """layers: (n_kv_heads, head_dim) per cached layer (target and drafter); K and V each."""
    return block_size * sum(2 * h * d for h, d in layers) * elem_size


def pool_budget_bytes(device, kv_cache_bytes: int | None, gpu_memory_utilization: float) -> int:
    """CPU: the byte budget (default 512 MiB). GPU: what is left under utilization * total after weights."""
    import torch

    if device.type != "cuda":
        return kv_cache_bytes if kv_cache_bytes is not None else 512 * 2**20
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    activation_headroom = 512 * 2**20
    return max(0, int(gpu_memory_utilization * total) - used - activation_headroom)


class KVPool:
    """Tensors: per layer (k, v) [num_blocks, block_size, n_kv_heads, head_dim] for target and drafter."""

    def __init__(self, num_blocks: int, block_size: int, target_layers: list[tuple[int, int]],
                 drafter_layers: list[tuple[int, int]], dtype, device):
        import torch

        def alloc(h: int, d: int):
            return (torch.zeros(num_blocks, block_size, h, d, dtype=dtype, device=device),
                    torch.zeros(num_blocks, block_size, h, d, dtype=dtype, device=device))

        self.target = [alloc(h, d) for h, d in target_layers]
        self.drafter = [alloc(h, d) for h, d in drafter_layers]
