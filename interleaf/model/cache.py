"""Preallocated key/value cache for decoding a batch of sequences of different lengths."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interleaf.errors import InterleafError


class KVCache:
    """Keys and values of every layer for B rows of up to `max_len` tokens, written by index.

    Storage is token-major, (n_layers, B, max_len + 1, n_kv_heads, head_dim), so a new token is
    one contiguous write and xformers can view a layer as one flat sequence; `.k` / `.v` show it
    as (n_layers, B, n_kv_heads, max_len, head_dim). Slot `max_len` is scratch: right-padding
    tokens of a `decode` call are written there and never attended to, which keeps the step free
    of data-dependent shapes. `lengths[b]` counts the valid tokens of row b.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layers, batch_size, max_len + 1, n_kv_heads, head_dim)
        self.k_store = torch.zeros(shape, dtype=dtype, device=device)
        self.v_store = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k_store.shape[1]

    @property
    def k(self) -> torch.Tensor:
        """(n_layers, B, n_kv_heads, max_len, head_dim) view of the keys."""
        return self.k_store[:, :, : self.max_len].transpose(2, 3)

    @property
    def v(self) -> torch.Tensor:
        """(n_layers, B, n_kv_heads, max_len, head_dim) view of the values."""
        return self.v_store[:, :, : self.max_len].transpose(2, 3)

    def write_positions(self, T: int, n_new: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) cache slots for T appended tokens; padding (t >= n_new) and overflow go to scratch.

        `positions` (B, T), when given, is `lengths[:, None] + arange(T)` computed by the caller.
        """
        t = torch.arange(T, device=self.lengths.device)
        pos = self.lengths[:, None] + t if positions is None else positions  # (B, T)
        valid = (t < n_new[:, None]) & (pos < self.max_len)
        return torch.where(valid, pos, self.max_len)

    def write_index(self, T: int, n_new: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B * T,) flat slots (row * (max_len + 1) + slot) for `update`, from `write_positions`."""
        slots = self.write_positions(T, n_new, positions)  # (B, T)
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None] * (self.max_len + 1)
        return (rows + slots).flatten()

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, T, n_kv_heads, hd) at `slots` (B, T) or flat `write_index` slots (B * T,).

        Returns the layer's (B, S+1, Hkv, hd) keys and values.
        """
        kc, vc = self.k_store[layer], self.v_store[layer]
        if slots.dim() == 1:  # one index_copy_ per tensor
            n = k.shape[0] * k.shape[1]
            kc.flatten(0, 1).index_copy_(0, slots, k.reshape(n, *k.shape[2:]).to(kc.dtype))
            vc.flatten(0, 1).index_copy_(0, slots, v.reshape(n, *v.shape[2:]).to(vc.dtype))
            return kc, vc
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(slots)
        kc[rows, slots] = k.to(kc.dtype)
        vc[rows, slots] = v.to(vc.dtype)
        return kc, vc

    def check_room(self, n_new: torch.Tensor) -> None:
        """Raise if some row would grow past max_len (reads lengths back: not for compiled steps)."""
        after = self.lengths + n_new
        if bool((after > self.max_len).any()):
            row = int(torch.argmax((after > self.max_len).int()))
            raise InterleafError(
                f"KV cache row {row} would hold {int(after[row])} tokens, more than its max_len {self.max_len}"
            )

    def check_room_host(self, after: Sequence[int]) -> None:
        """Like `check_room`, from the lengths each row would have (host ints)."""
        for row, n in enumerate(after):
            if n > self.max_len:
                raise InterleafError(f"KV cache row {row} would hold {n} tokens, more than its max_len {self.max_len}")

    def copy_rows(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Fork rows: row dst[i] becomes a copy of row src[i] (keys, values and length)."""
        if len(src) != len(dst):
            raise InterleafError(f"copy_rows: {len(src)} source rows but {len(dst)} destination rows")
        s = torch.as_tensor(list(src), dtype=torch.long, device=self.lengths.device)
        d = torch.as_tensor(list(dst), dtype=torch.long, device=self.lengths.device)
        for t in (s, d):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.batch_size):
                raise InterleafError(f"copy_rows: row index outside [0, {self.batch_size})")
        self.k_store[:, d] = self.k_store[:, s]
        self.v_store[:, d] = self.v_store[:, s]
        self.lengths[d] = self.lengths[s]

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty all rows, or only `rows`."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(list(rows), dtype=torch.long, device=self.lengths.device)] = 0

    def drop_last(self, rows: Sequence[int], n: int) -> None:
        """Forget the last `n` tokens of `rows` (rejected drafts): no step attends to them again, and
        the next tokens written to those rows overwrite their slots."""
        self.lengths[torch.as_tensor(list(rows), dtype=torch.long, device=self.lengths.device)] -= n
