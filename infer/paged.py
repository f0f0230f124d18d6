"""Attention's KV cache in a pool of fixed-size blocks, as vLLM's PagedAttention keeps it.

Every attention layer owns two tensors, keys (N, H_kv, D, block_size) (transposed) and values
(N, H_kv, block_size, D), and a sequence owns a list of block ids (its block table): token t of
the sequence lives in block table[t // block_size] at offset t % block_size, in every attention
layer at once. A block's keys are laid out as the native step's attention reads them (each
dimension's block_size scores one vector product, as zoo.kernels' contiguous k_t); the same
layout with one block a row is the native step's contiguous cache. A finished
sequence hands its blocks back and the next one reuses them: memory follows the tokens actually
held, never a per-sequence maximum, and nothing is ever copied to grow a cache.
"""

from __future__ import annotations

import torch


class KVBlockPool:
    """The blocks of every attention layer and which of them are free.

    `layer_shapes` maps a layer index to its (H_kv, D); every layer gets `num_blocks` blocks of
    `block_size` tokens, allocated once here."""

    def __init__(
        self, layer_shapes: dict[int, tuple[int, int]], num_blocks: int, block_size: int,
        dtype: torch.dtype, device: torch.device,
    ):
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be a positive number of tokens")
        if num_blocks < 0:
            raise ValueError(f"kv_blocks={num_blocks} must be >= 0")
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer, (heads, head_dim) in layer_shapes.items():
            # left unwritten: a block is zeroed when first handed out (`allocate`), so the
            # memory of blocks never used is never touched, and the operating system commits
            # only what sequences actually use
            self.keys[layer] = torch.empty((num_blocks, heads, head_dim, block_size),
                                           dtype=dtype, device=device)
            self.values[layer] = torch.empty((num_blocks, heads, block_size, head_dim),
                                             dtype=dtype, device=device)
        self._never_used = torch.ones(num_blocks, dtype=torch.bool)
        # handed out from the end, so the lowest ids go first (easier to read in tests and logs)
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """How many blocks hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def bytes_per_token(self) -> int:
        """KV bytes one token takes over all attention layers."""
        return sum(2 * k[0].numel() // self.block_size * k.element_size()
                   for k in self.keys.values())

    def allocate(self, count: int) -> list[int]:
        """`count` free block ids; a ValueError when fewer are free (callers check first)."""
        if count > len(self._free):
            raise ValueError(f"{count} KV blocks asked for, {len(self._free)} free")
        taken = self._free[len(self._free) - count:][::-1]
        del self._free[len(self._free) - count:]
        fresh = [b for b in taken if self._never_used[b]]
        if fresh:
            # attention masks the slots past a sequence's tokens, but a mask cannot cancel a
            # NaN that uninitialised memory may hold (NaN * 0 is NaN): fresh blocks start at 0;
            # a reused block holds its last owner's finite keys
            index = torch.tensor(fresh, device=next(iter(self.keys.values())).device)
            for tensor in (*self.keys.values(), *self.values.values()):
                tensor.index_fill_(0, index, 0)
            self._never_used[fresh] = False
        return taken

    def release(self, blocks: list[int]) -> None:
        """Hand `blocks` back; they are reused by the next allocation."""
        self._free.extend(reversed(blocks))

    def slots(self, blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """The flat token slots (block * block_size + offset) of positions start .. start +
        count - 1 of one sequence whose block table is `blocks` (M,) long."""
        positions = torch.arange(start, start + count, device=blocks.device)
        return blocks[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (T, H_kv, D) into the flat token `slots` (T,) of `layer`'s blocks."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.keys[layer][blocks, :, :, offsets] = k.to(self.keys[layer].dtype)
        self.values[layer][blocks, :, offsets] = v.to(self.values[layer].dtype)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values at the flat token `slots` (T,) of `layer`: each (T, H_kv, D)."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        return self.keys[layer][blocks, :, :, offsets], self.values[layer][blocks, :, offsets]
