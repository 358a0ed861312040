"""Cell keys and tensor helpers shared by the batched processors (slots.py and its subclasses).

A history cell holds a token id (>= 0) or one of the negative keys below, which never equal a token.
"""

from __future__ import annotations

import torch

# Keys: token ids are >= 0; these never equal a token. OUTSIDE_BASE - k encodes id vocab + k.
EMPTY = -1  # before a request's first token (and "skip" for the windowed penalty)
BREAK = -2  # a DRY sequence breaker in the history
NEVER = -3  # compared against, matches no cell
OUTSIDE_BASE = -4
UNBOUNDED = 1 << 30  # a range or window of 0 (none): wider than any context, still an int32
SCATTERED_VOCAB = 4096  # logits rows wider than the CPU caches hold comfortably


def grown(tensor: torch.Tensor, shape: tuple[int, ...], fill: float | int = 0) -> torch.Tensor:
    """A bigger copy of ``tensor`` (new cells hold ``fill``)."""
    out = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def moved(tensor: torch.Tensor, shape: tuple[int, int], src: int, dst: int, count: int,
          fill: float | int = 0) -> torch.Tensor:  # fmt: skip
    """A [slots, columns] copy of ``tensor`` of ``shape`` where columns ``src:src+count`` land at ``dst``."""
    out = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
    if count > 0:
        out[: tensor.shape[0], dst : dst + count] = tensor[:, src : src + count]
    return out


def scatter_min(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor) -> None:
    """``logits[rows[i], tokens[i, j]] = min(itself, values[i, j])`` for every i, j in one op.

    Every Governor processor only ever lowers a logit, and a token listed twice in a row gets the
    same value each time (or +inf where the cell is not meant to change), so min is exact and
    independent of order, on every device.
    """
    width = logits.shape[-1]
    flat = logits.view(-1) if logits.is_contiguous() else logits.contiguous().view(-1)
    target = (rows.unsqueeze(1) * width + tokens).flatten()
    flat.scatter_reduce_(0, target, values.flatten(), "amin")
    if flat.data_ptr() != logits.data_ptr():
        logits.copy_(flat.view_as(logits))


def outside_keys(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids as int32 keys; ids past the vocabulary become ``OUTSIDE_BASE - (id - vocab)``."""
    over = (tokens - vocab_size).clamp(min=-1, max=(1 << 31) + OUTSIDE_BASE - 1)
    return torch.where(over >= 0, OUTSIDE_BASE - over, tokens).to(torch.int32)
