from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from estuary.model.evaluate import bits_per_byte
from estuary.model.presets import build_preset
from estuary.model.pretrain import lm_loss, pretrain, pretrained_preset


class _Out:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _Uniform(nn.Module):
    """Predicts every byte with probability 1/256: exactly 8 bits per byte."""

    def forward(self, input_ids: torch.Tensor) -> _Out:
        return _Out(torch.zeros(*input_ids.shape, 256))


def test_uniform_model_scores_eight_bits_per_byte() -> None:
    windows = torch.randint(0, 256, (5, 33))

    assert bits_per_byte(_Uniform(), windows, batch_size=2) == pytest.approx(8.0, abs=1e-5)


def test_bits_per_byte_matches_loss_and_ignores_batching() -> None:
    model = build_preset("tiny", seed=1)
    windows = torch.randint(0, 256, (6, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = lm_loss(model, windows).item() / math.log(2)

    assert bits_per_byte(model, windows, batch_size=4) == pytest.approx(expected, rel=1e-5)
    assert bits_per_byte(model, windows, batch_size=1) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (7,)])
def test_bits_per_byte_rejects_bad_windows(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="windows"):
        bits_per_byte(_Uniform(), torch.zeros(shape, dtype=torch.long))


def test_pretrain_is_deterministic_and_learns() -> None:
    a = pretrained_preset("tiny", steps=25, seed=5, batch_size=4, seq_len=64)
    b = pretrained_preset("tiny", steps=25, seed=5, batch_size=4, seq_len=64)
    # Same seed, no training: only the 25 steps can tell a and c apart.
    c = pretrained_preset("tiny", steps=0, seed=5, batch_size=4, seq_len=64)

    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_pretrain_reduces_loss() -> None:
    model = build_preset("tiny", seed=0)
    text = b"def f(x):\n    return x + 1\n" * 50

    result = pretrain(model, text, steps=30, batch_size=4, seq_len=32, seed=0)

    assert len(result.losses) == 30
    assert result.tokens == 30 * 4 * 32
    # A repeated 28-byte line is learnable: well below the 8-bit uniform start.
    assert result.losses[-1] < result.losses[0] - 2.0


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"clip_norm": 0}, "clip")]
)
def test_pretrain_rejects_bad_arguments(kwargs: dict[str, float], name: str) -> None:
    args: dict[str, float] = {"steps": 1} | kwargs
    with pytest.raises(ValueError, match=name):
        pretrain(build_preset("tiny"), b"x" * 300, **args)  # type: ignore[arg-type]
