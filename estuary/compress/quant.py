"""Weight-only quantisation of a frozen base, trainable *through*.

Every ``nn.Linear`` (and the token embedding) of the base is replaced by a module that
keeps only the quantised weight and dequantises it on the fly inside a custom
``torch.autograd.Function``. The weight gets no gradient (it is frozen), but the input
does, so gradients flow to every adapter upstream. torch's own dynamic-quantised Linear
is *not* used: it has no backward and silently yields zero gradients upstream.

Schemes
-------
``int8``
    Symmetric, per output channel: ``w ≈ q · s`` with ``q ∈ [-127, 127]`` and
    ``s = max|w_row| / 127``. Per-row scales keep one large row from crushing the
    resolution of the others; -128 is unused so the range is symmetric and 0 is exact.
``nf4``
    Block-wise 4-bit NormalFloat (Dettmers et al., QLoRA 2023): each block of
    :data:`NF4_BLOCK` consecutive weights is divided by its absmax and rounded to the
    nearest of 16 levels placed at normal quantiles, which fit the bell-shaped weight
    distribution better than 16 evenly spaced levels. Two codes per byte.

Scales are stored in float16: their relative error (≤ 2⁻¹¹) is far below the
quantisation step, and at 2 bytes instead of 4 they keep the int8 base ≥ 3.9× smaller
than fp32 even for 128-wide layers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from estuary.model.loading import check_safetensors

logger = logging.getLogger(__name__)

Scheme = Literal["int8", "nf4"]
SCHEMES: tuple[Scheme, ...] = ("int8", "nf4")

#: Largest int8 code used: symmetric range so that negation is exact and 0 maps to 0.
INT8_MAX = 127

#: NF4 block length: QLoRA's choice; 64 weights share one fp16 absmax, an overhead of
#: 0.25 bit per weight (4.25 bits in all, ≈ 7.5× smaller than fp32).
NF4_BLOCK = 64

#: The 16 NF4 levels (QLoRA, Appendix E): quantiles of N(0, 1) normalised to [-1, 1],
#: with an exact zero.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: File name of a compressed base inside its directory (next to ``config.json``).
COMPRESSED_FILE = "compressed_model.safetensors"
#: safetensors metadata key holding the JSON description of the quantised modules.
METADATA_KEY = "estuary_compression"

# Scales are floored at the smallest positive float16 (2^-24) so an all-zero row or
# block does not divide by zero once the scale is stored in float16.
_MIN_SCALE = 2.0**-24


def _fp16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales *up* to float16.

    Rounding down would let ``|w| / scale`` exceed the largest code and be clamped;
    rounding up keeps every weight inside the range, so the error stays ≤ half a step.
    """
    scale = scale.clamp_min(_MIN_SCALE)
    half = scale.to(torch.float16)
    inf = torch.full_like(half, float("inf"))
    return torch.where(half.float() < scale, torch.nextafter(half, inf), half)


class QuantizedWeight(nn.Module):
    """A quantised 2-D weight that can give back its float approximation."""

    shape: tuple[int, int]
    scheme: Scheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the ``(out, in)`` float approximation of the weight."""
        raise NotImplementedError

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return selected rows ``weight[index]`` (used by embeddings)."""
        return self.dequantize(dtype)[index]


class Int8Weight(QuantizedWeight):
    """Symmetric int8 weight with one float16 scale per output row."""

    q: torch.Tensor
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.ndim != 2:
            raise ValueError(f"q: need a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        if scale.shape != (q.shape[0],):
            raise ValueError(f"scale: need shape ({q.shape[0]},), got {tuple(scale.shape)}")
        self.scheme = "int8"
        self.shape = (int(q.shape[0]), int(q.shape[1]))
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(torch.float16))

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Quantise a 2-D float weight per output row."""
        w = weight.detach().float()
        # Round with the float16 scale actually stored, so dequantisation matches the codes.
        scale16 = _fp16_ceil(w.abs().amax(dim=1) / INT8_MAX)
        q = torch.round(w / scale16.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(q, scale16)

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> Int8Weight:
        """Return a placeholder of ``shape`` to load a state dict into."""
        return cls(torch.zeros(shape, dtype=torch.int8), torch.zeros(shape[0]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return ``q · scale`` as an ``(out, in)`` tensor."""
        return (self.q.to(dtype) * self.scale.to(dtype)[:, None]).contiguous()

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantise only the selected rows."""
        return self.q[index].to(dtype) * self.scale[index].to(dtype).unsqueeze(-1)


class NF4Weight(QuantizedWeight):
    """Block-wise NF4 weight: packed 4-bit codes and one float16 absmax per block."""

    packed: torch.Tensor
    absmax: torch.Tensor
    levels: torch.Tensor

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int]) -> None:
        super().__init__()
        numel = shape[0] * shape[1]
        blocks = -(-numel // NF4_BLOCK)
        if packed.dtype != torch.uint8 or packed.shape != (blocks * NF4_BLOCK // 2,):
            raise ValueError(
                f"packed: need uint8 of shape ({blocks * NF4_BLOCK // 2},), "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )
        if absmax.shape != (blocks,):
            raise ValueError(f"absmax: need shape ({blocks},), got {tuple(absmax.shape)}")
        self.scheme = "nf4"
        self.shape = (int(shape[0]), int(shape[1]))
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax.to(torch.float16))
        # The codebook is a constant of the format, not state: not saved.
        self.register_buffer("levels", torch.tensor(NF4_LEVELS), persistent=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> NF4Weight:
        """Quantise a 2-D float weight in blocks of :data:`NF4_BLOCK`."""
        w = weight.detach().float().reshape(-1)
        numel = w.numel()
        blocks = -(-numel // NF4_BLOCK)
        # Zero-pad the flat weight to whole blocks: (numel,) -> (blocks, NF4_BLOCK)
        padded = torch.zeros(blocks * NF4_BLOCK)
        padded[:numel] = w
        padded = padded.reshape(blocks, NF4_BLOCK)
        absmax = _fp16_ceil(padded.abs().amax(dim=1))
        normed = padded / absmax.float()[:, None]
        levels = torch.tensor(NF4_LEVELS)
        # Nearest level: boundaries are the midpoints between adjacent levels.
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize(normed.clamp(-1, 1), midpoints).to(torch.uint8).reshape(-1)
        # (blocks * NF4_BLOCK,) -> (blocks * NF4_BLOCK / 2, 2): low nibble first
        pairs = codes.reshape(-1, 2)
        packed = (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()
        return cls(packed, absmax, (int(weight.shape[0]), int(weight.shape[1])))

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> NF4Weight:
        """Return a placeholder of ``shape`` to load a state dict into."""
        blocks = -(-(shape[0] * shape[1]) // NF4_BLOCK)
        return cls(
            torch.zeros(blocks * NF4_BLOCK // 2, dtype=torch.uint8), torch.zeros(blocks), shape
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the ``(out, in)`` approximation ``level[code] · absmax[block]``."""
        low = self.packed & 0x0F
        high = self.packed >> 4
        # (n/2,) low and high nibbles -> (n/2, 2) -> (blocks, NF4_BLOCK)
        codes = torch.stack((low, high), dim=1).reshape(-1, NF4_BLOCK).long()
        values = self.levels.to(dtype)[codes] * self.absmax.to(dtype)[:, None]
        # (blocks, NF4_BLOCK) -> (blocks * NF4_BLOCK,) -> trim padding -> (out, in)
        out, inp = self.shape
        return values.reshape(-1)[: out * inp].reshape(out, inp)


#: Weight class of each scheme.
_WEIGHT_CLASSES: dict[str, type[Int8Weight] | type[NF4Weight]] = {
    "int8": Int8Weight,
    "nf4": NF4Weight,
}


def _weight_class(scheme: str) -> type[Int8Weight] | type[NF4Weight]:
    try:
        return _WEIGHT_CLASSES[scheme]
    except KeyError:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; choose one of {SCHEMES}") from None


def quantize_weight(weight: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Return ``weight`` quantised with ``scheme``."""
    return _weight_class(scheme).quantize(weight)


def _empty_weight(scheme: str, shape: tuple[int, int]) -> QuantizedWeight:
    return _weight_class(scheme).empty(shape)


class _DequantLinear(torch.autograd.Function):
    """``y = x Wᵀ`` with ``W`` dequantised in forward and again in backward.

    Dequantising twice instead of saving ``W`` keeps only one layer's float weight
    alive at a time; the weight itself is frozen, so only the input gets a gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
        ctx.qweight = qweight
        return nn.functional.linear(x, qweight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        qweight = cast(QuantizedWeight, ctx.qweight)
        # (..., out) @ (out, in) -> (..., in)
        return grad_out.matmul(qweight.dequantize(grad_out.dtype)), None


class QuantLinear(nn.Module):
    """Frozen ``nn.Linear`` replacement holding a quantised weight."""

    bias: torch.Tensor | None

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> QuantLinear:
        """Quantise ``linear``'s weight with ``scheme``; the bias stays in float."""
        return cls(quantize_weight(linear.weight, scheme), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x Wᵀ + b`` with gradients to ``x`` only."""
        # torch's stubs leave Function.apply untyped; it returns forward's Tensor.
        y = cast(torch.Tensor, _DequantLinear.apply(x, self.qweight))  # type: ignore[no-untyped-call]
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def add_delta(self, delta: torch.Tensor) -> None:
        """Merge ``delta`` into the weight: dequantise, add, re-quantise.

        Changes smaller than half a quantisation step are rounded away; the cloud
        therefore merges into its full-precision base and re-compresses from it.
        """
        if tuple(delta.shape) != self.qweight.shape:
            raise ValueError(
                f"delta: shape {tuple(delta.shape)} does not match weight {self.qweight.shape}"
            )
        merged = self.qweight.dequantize() + delta.float()
        self.qweight = quantize_weight(merged, self.qweight.scheme)

    def extra_repr(self) -> str:
        """Describe shape and scheme."""
        return f"in={self.in_features}, out={self.out_features}, scheme={self.qweight.scheme}"


class QuantEmbedding(nn.Module):
    """Frozen ``nn.Embedding`` replacement holding a quantised table."""

    def __init__(self, qweight: QuantizedWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, scheme: Scheme) -> QuantEmbedding:
        """Quantise ``embedding``'s table with ``scheme``."""
        return cls(quantize_weight(embedding.weight, scheme), embedding.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Return the dequantised rows of ``ids`` (``(...,)`` -> ``(..., dim)``)."""
        return self.qweight.rows(ids)


def _quantizable(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in list(model.named_modules()):
        if type(module) in (nn.Linear, nn.Embedding):
            yield name, module


def compress_model(model: nn.Module, *, scheme: Scheme) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Embedding`` of ``model`` in place; freeze all.

    Parameters
    ----------
    model
        A full-precision model (any Hugging Face causal LM). Tied input/output
        embeddings are quantised as two modules.
    scheme
        ``"int8"`` or ``"nf4"``.

    Returns
    -------
    nn.Module
        ``model`` itself, with quantised modules and every remaining parameter
        (norms) frozen.

    Raises
    ------
    ValueError
        If ``scheme`` is unknown or the model has nothing to quantise.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown scheme {scheme!r}; choose one of {SCHEMES}")
    replaced = 0
    for name, module in _quantizable(model):
        if isinstance(module, nn.Linear):
            model.set_submodule(name, QuantLinear.from_linear(module, scheme))
        else:
            model.set_submodule(
                name, QuantEmbedding.from_embedding(cast(nn.Embedding, module), scheme)
            )
        replaced += 1
    if replaced == 0:
        raise ValueError("model: no nn.Linear or nn.Embedding modules to compress")
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    logger.info("compressed %d modules with %s", replaced, scheme)
    return model


def frozen_weight_bytes(model: nn.Module) -> int:
    """Return the bytes of the frozen base's saved state (adapter tensors excluded).

    Counts every tensor of ``model.state_dict()`` (parameters and persistent buffers:
    quantised codes, scales, norms, biases) except LoRA adapter tensors
    (names containing ``lora_``).
    """
    return sum(
        t.numel() * t.element_size() for k, t in model.state_dict().items() if "lora_" not in k
    )


def _describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    modules: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear | QuantEmbedding):
            modules[name] = {
                "kind": "linear" if isinstance(module, QuantLinear) else "embedding",
                "scheme": module.qweight.scheme,
                "shape": list(module.qweight.shape),
                "bias": isinstance(module, QuantLinear) and module.bias is not None,
                "padding_idx": getattr(module, "padding_idx", None),
            }
    return modules


def save_compressed(model: nn.Module, out_dir: str | Path) -> Path:
    """Save a compressed Hugging Face model: ``config.json`` + safetensors weights.

    The safetensors metadata records every quantised module (kind, scheme, shape) so
    :func:`load_compressed` can rebuild the structure without the full-precision base.

    Returns
    -------
    Path
        The written safetensors file.

    Raises
    ------
    ValueError
        If ``model`` holds no quantised modules or has no ``config``.
    """
    from safetensors.torch import save_file

    modules = _describe(model)
    if not modules:
        raise ValueError("model: not compressed (call compress_model first)")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: has no Hugging Face config to save")
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "lora_" not in k}
    file = path / COMPRESSED_FILE
    save_file(state, str(file), metadata={METADATA_KEY: json.dumps(modules, sort_keys=True)})
    return file


def load_compressed(model_dir: str | Path) -> nn.Module:
    """Load a base saved by :func:`save_compressed`, frozen and in eval mode.

    Raises
    ------
    estuary.model.loading.CheckpointError
        If ``config.json`` or the weight file is missing, corrupt or truncated, or the
        file is not a compressed base; the message names the file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from estuary.model.loading import CheckpointError

    path = Path(model_dir)
    config_path = path / "config.json"
    file = path / COMPRESSED_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: no config.json; not a model directory")
    if not file.is_file():
        raise CheckpointError(f"{file}: no compressed weights found")
    check_safetensors(file)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: corrupt safetensors file: {exc}") from exc
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{file}: not a compressed base (no {METADATA_KEY} metadata)")
    modules: dict[str, dict[str, Any]] = json.loads(metadata[METADATA_KEY])
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    # transformers leaves from_config unannotated.
    model = cast(nn.Module, AutoModelForCausalLM.from_config(config))  # type: ignore[no-untyped-call]
    for name, spec in modules.items():
        shape = (int(spec["shape"][0]), int(spec["shape"][1]))
        qweight = _empty_weight(str(spec["scheme"]), shape)
        replacement: nn.Module
        if spec["kind"] == "linear":
            bias = torch.zeros(shape[0]) if spec["bias"] else None
            replacement = QuantLinear(qweight, bias)
        else:
            replacement = QuantEmbedding(qweight, spec["padding_idx"])
        model.set_submodule(name, replacement)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{file}: weights do not match config.json: {exc}") from exc
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model
