"""Fixed-point numerics: clipping, stochastic rounding, two's complement in Z_(2^b), packing.

Worst-case bound. After L2 clipping to ``clip`` every element satisfies |x| ≤ clip; after the
client-side weight w ∈ [0, weight_bound] and scaling by 2^f, stochastic rounding yields an
integer q with |q| ≤ q_max = ceil(weight_bound · clip · 2^f). The sum of n clients then satisfies
|Σ q| ≤ n · q_max, and it decodes without wrapping iff n · q_max ≤ 2^(b-1) - 1. Configurations
that break this are refused up front (:class:`~secure_agg.errors.OverflowRefused`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secure_agg.constants import MAX_BITS, MIN_BITS
from secure_agg.errors import OverflowRefused

logger = logging.getLogger(__name__)

UInt32Array = npt.NDArray[np.uint32]
Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.floating]

_FRAC_BITS_RANGE = range(-32, 53)
"""Scale exponents considered when choosing f: beyond 52 fractional bits float64 inputs carry
no more precision, below -32 every element of a 32-bit field would round to zero."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of weighted, clipped updates in Z_(2^b).

    Parameters
    ----------
    bits
        Modulus exponent b, 2 ≤ b ≤ 32. Sums live in Z_(2^b), read as signed two's complement.
    frac_bits
        Scale exponent f: an update x is encoded as round(w · x · 2^f).
    clip
        L2 clipping bound, > 0 and finite. Also bounds every element.
    weight_bound
        Largest client-side weight w (the staleness weight); part of the bit budget. > 0.
    per_tensor
        Clip every named tensor to ``clip`` separately (True) or the whole update (False).
    """

    bits: int
    frac_bits: int
    clip: float
    weight_bound: float = 1.0
    per_tensor: bool = False

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.frac_bits not in _FRAC_BITS_RANGE:
            raise ValueError(f"frac_bits must be in [-32, 52], got {self.frac_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be finite and > 0, got {self.clip}")
        if not (math.isfinite(self.weight_bound) and self.weight_bound > 0):
            raise ValueError(f"weight_bound must be finite and > 0, got {self.weight_bound}")

    @property
    def modulus(self) -> int:
        """The modulus 2^b."""
        return 1 << self.bits

    @property
    def element_bound(self) -> int:
        """q_max: the largest magnitude of one client's quantised element."""
        return math.ceil(self.weight_bound * self.clip * 2.0**self.frac_bits)

    def max_clients(self) -> int:
        """Largest number of clients whose worst-case sum cannot wrap."""
        return ((1 << (self.bits - 1)) - 1) // self.element_bound

    def check_capacity(self, clients: int) -> None:
        """Refuse a cohort of ``clients`` whose worst-case sum could wrap.

        Raises
        ------
        OverflowRefused
            If clients · q_max > 2^(b-1) - 1, with every number in the message.
        """
        limit = (1 << (self.bits - 1)) - 1
        worst = clients * self.element_bound
        if worst > limit:
            raise OverflowRefused(
                f"worst-case sum {clients} clients × q_max {self.element_bound} "
                f"(clip {self.clip} × weight bound {self.weight_bound} × 2^{self.frac_bits}) "
                f"= {worst} exceeds 2^({self.bits}-1)-1 = {limit}; at most "
                f"{self.max_clients()} clients fit, or lower frac_bits / raise bits"
            )

    @classmethod
    def for_cohort(
        cls,
        clients: int,
        *,
        bits: int,
        clip: float,
        weight_bound: float = 1.0,
        per_tensor: bool = False,
    ) -> FixedPoint:
        """Choose the largest scale exponent f for which ``clients`` cannot overflow.

        Raises
        ------
        OverflowRefused
            If no f in [-32, 52] fits.
        """
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        for frac in reversed(_FRAC_BITS_RANGE):
            candidate = cls(
                bits=bits,
                frac_bits=frac,
                clip=clip,
                weight_bound=weight_bound,
                per_tensor=per_tensor,
            )
            if clients * candidate.element_bound <= (1 << (bits - 1)) - 1:
                return candidate
        raise OverflowRefused(
            f"no scale fits {clients} clients in {bits} bits with clip {clip} "
            f"and weight bound {weight_bound}"
        )


_REAL_KINDS = frozenset("biuf")
"""numpy dtype kinds an update may have: bool, signed and unsigned integers, floating point.
Complex values would lose their imaginary part in the float64 conversion; objects, strings
and dates are not numbers to mask."""


def _sum_of_squares(values: npt.NDArray[np.float64]) -> float:
    # Not np.dot / np.linalg.norm: those go through BLAS, whose thread pool costs milliseconds
    # of synchronisation on a busy 2-core machine for a 100k-element vector.
    return float(np.square(values).sum())


def _norm(arrays: list[npt.NDArray[np.float64]]) -> float:
    """L2 norm of the concatenation of ``arrays``, finite for any finite input."""
    with np.errstate(over="ignore"):  # an overflow is detected below, not warned about
        total = math.sqrt(sum(_sum_of_squares(a) for a in arrays))
    if math.isfinite(total):
        return total
    # The squares overflowed (elements beyond ~1e154): rescale by the largest magnitude, or
    # the clip factor clip / inf would silently zero the whole update.
    peak = max(float(np.abs(a).max()) for a in arrays if a.size)
    return peak * math.sqrt(sum(_sum_of_squares(a / peak) for a in arrays))


def clip_update(
    update: Mapping[str, FloatArray], *, clip: float, per_tensor: bool
) -> dict[str, npt.NDArray[np.float64]]:
    """Scale tensors down so that their L2 norm (global or per tensor) is at most ``clip``.

    Raises
    ------
    ValueError
        If a tensor is not real-valued (complex, object, string, ...) or holds NaN or ±inf;
        the message names the tensor.
    """
    arrays: dict[str, npt.NDArray[np.float64]] = {}
    for name, value in update.items():
        raw = np.asarray(value)
        if raw.dtype.kind not in _REAL_KINDS:
            raise ValueError(
                f"update tensor {name!r} has dtype {raw.dtype}: only real numbers "
                "(bool, integer or floating point) can be masked"
            )
        arr = raw.astype(np.float64, copy=False).ravel()
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"update tensor {name!r} has non-finite values (NaN or ±inf)")
        arrays[name] = arr
    if per_tensor:
        for name, arr in arrays.items():
            norm = _norm([arr])
            if norm > clip:
                arrays[name] = arr * (clip / norm)
        return arrays
    total = _norm(list(arrays.values()))
    if total > clip:
        factor = clip / total
        arrays = {name: arr * factor for name, arr in arrays.items()}
    return arrays


def stochastic_round(values: npt.NDArray[np.float64], *, rng: np.random.Generator) -> Int64Array:
    """Round to floor(v) or floor(v) + 1 with probabilities that make the result unbiased."""
    noise = rng.random(values.shape)
    return np.floor(values + noise).astype(np.int64)


def quantize(
    update: Mapping[str, FloatArray],
    *,
    fixed_point: FixedPoint,
    weight: float,
    rng: np.random.Generator,
) -> dict[str, Int64Array]:
    """Clip, weight, scale and stochastically round an update to signed integers.

    Tensors are processed in name order so that the rounding noise drawn from ``rng`` does not
    depend on the mapping's insertion order.
    """
    if not (0.0 <= weight <= fixed_point.weight_bound):
        raise ValueError(f"weight must be in [0, {fixed_point.weight_bound}], got {weight}")
    clipped = clip_update(update, clip=fixed_point.clip, per_tensor=fixed_point.per_tensor)
    scale = weight * 2.0**fixed_point.frac_bits
    # Rounding error in w · x · 2^f could exceed the bound by an ulp; clamp before rounding.
    limit = fixed_point.weight_bound * fixed_point.clip * 2.0**fixed_point.frac_bits
    out: dict[str, Int64Array] = {}
    for name in sorted(clipped):
        scaled = np.clip(clipped[name] * scale, -limit, limit)
        out[name] = stochastic_round(scaled, rng=rng)
    return out


def to_ring(values: Int64Array, *, bits: int) -> UInt32Array:
    """Two's-complement embedding of signed integers into Z_(2^b), stored as uint32."""
    return (values.astype(np.uint64) & np.uint64((1 << bits) - 1)).astype(np.uint32)


def from_ring(values: UInt32Array, *, bits: int) -> Int64Array:
    """Read elements of Z_(2^b) as signed two's-complement integers."""
    wide = values.astype(np.int64) & ((1 << bits) - 1)
    return np.where(wide >= (1 << (bits - 1)), wide - (1 << bits), wide)


def reduce_ring(values: UInt32Array, *, bits: int) -> UInt32Array:
    """Reduce uint32 values (which wrap mod 2^32) to Z_(2^b) in place and return them."""
    if bits < 32:
        np.bitwise_and(values, np.uint32((1 << bits) - 1), out=values)
    return values


def pack(values: UInt32Array, *, bits: int) -> bytes:
    """Pack elements of Z_(2^b) into ceil(b / 8) little-endian bytes each."""
    width = (bits + 7) // 8
    little = values.astype("<u4", copy=False)
    if width == 4:
        return little.tobytes()
    as_bytes = little.view(np.uint8).reshape(-1, 4)  # (m, 4): little-endian bytes per element
    return np.ascontiguousarray(as_bytes[:, :width]).tobytes()


def unpack(data: bytes, *, bits: int, length: int) -> UInt32Array:
    """Inverse of :func:`pack`; the caller checks the length and the range.

    Raises
    ------
    ValueError
        If ``data`` does not hold exactly ``length`` elements.
    """
    width = (bits + 7) // 8
    if len(data) != width * length:
        raise ValueError(f"expected {width * length} bytes for {length} elements, got {len(data)}")
    if width == 4:
        return np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if width == 3:
        # Unaligned 4-byte loads at a 3-byte stride, then drop the neighbour's byte: one pass,
        # 2.5x faster than widening through a (m, 4) byte array. The pad byte keeps the last
        # load inside the buffer.
        padded = data + b"\0"
        strided: UInt32Array = np.ndarray(
            shape=(length,), dtype=np.dtype("<u4"), buffer=padded, strides=(3,)
        )
        low: UInt32Array = np.bitwise_and(strided, np.uint32(0xFFFFFF)).astype(np.uint32)
        return low
    return np.frombuffer(data, dtype="<u2" if width == 2 else np.uint8).astype(np.uint32)
