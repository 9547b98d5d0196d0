"""Held-out evaluation in torch: bits per byte."""

from __future__ import annotations

import math

import torch
from torch import nn

from estuary.model.pretrain import lm_loss


@torch.no_grad()
def bits_per_byte(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 16) -> float:
    """Return the mean next-token loss of ``model`` over ``windows``, in bits per byte.

    For the byte-level presets one token is one byte, so this is the cross-entropy in
    nats divided by ln 2, averaged over every predicted position.

    Parameters
    ----------
    model
        A causal LM whose ``forward(input_ids=...)`` returns an object with ``logits``.
    windows
        ``(n, seq_len + 1)`` int64 token ids (see :func:`estuary.data.eval_windows`).
    batch_size
        Windows per forward pass; bounds memory, does not change the result.

    Raises
    ------
    ValueError
        If ``windows`` is not a non-empty 2-D tensor with at least 2 columns.
    """
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows: need shape (n>0, seq_len+1>=2), got {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    total_nats = 0.0
    total_tokens = 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size]
        loss = lm_loss(model, chunk, reduction="sum")
        total_nats += float(loss)
        total_tokens += chunk[:, 1:].numel()
    model.train(was_training)
    return total_nats / total_tokens / math.log(2)
