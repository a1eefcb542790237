"""Batch-invariant evaluation on the CPU.

oneDNN, behind torch's CPU convolutions, picks its kernels and blockings by the batch size, so a row's result
changes in its last float bits with how many rows it is computed with; after rounding to uint8, now and then a
pixel moves by one grey level. A vote runs later passes on the rows still undecided and a batch ends with a short
chunk, so without care the same key and seed would not give the same image in every batch. Every batch-sensitive
call (the UNet, the Gaussian blur) therefore runs on the CPU in calls of exactly CPU_CHUNK rows, the last one padded
by repeating its last row; a row's result then depends on that row alone. The padding costs at most CPU_CHUNK - 1
rows of compute per call. An accelerator gets the whole batch: its libraries make no such promise per row anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Rows per CPU call: small enough that activations stay in cache (the CPU rate peaks there, docs/benchmarks.md).
CPU_CHUNK = 16


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = CPU_CHUNK) -> torch.Tensor:
    """`fn(x)` for a row-independent `fn`, computed so that each row's result does not depend on the others: on the
    CPU in calls of exactly `size` rows (the last padded by repeating its last row), elsewhere in one call."""
    if x.device.type != "cpu" or len(x) == size:
        return fn(x)
    out = []
    for part in x.split(size):
        n = len(part)
        if n < size:
            part = torch.cat([part, part[-1:].expand(size - n, *part.shape[1:])])
        out.append(fn(part)[:n])
    return torch.cat(out) if out else fn(x)
