"""Public parameters of one secure aggregation session, shared by the server and every client."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from secure_agg.constants import (
    LABEL_PARAMS,
    MAX_COHORT_ID_BYTES,
    MAX_TENSOR_NAME_BYTES,
    MIN_COHORT_SIZE,
    PROTOCOL_VERSION,
)
from secure_agg.crypto import MaskLayout, mask_layout
from secure_agg.numerics import FixedPoint

_MAX_ID = 2**32 - 1
"""Client ids travel as uint32."""


@dataclass(frozen=True)
class SessionConfig:
    """Everything the parties must agree on before AdvertiseKeys.

    Parameters
    ----------
    cohort
        The coordinator's cohort id (1 to 64 bytes); bound into signatures and the session id.
    cohort_size
        n: the number of clients invited, at least ``MIN_COHORT_SIZE`` (3). Also the worst case
        of the overflow check.
    threshold
        t: global (complete graph) or per closed neighbourhood (SecAgg+); see
        :mod:`secure_agg.graph` for how to choose it. More than half of the share holders of a
        secret (n, or k + 1 for SecAgg+), in either mode: each honest client answers one unmask
        request, so two disjoint t-subsets of the holders (one asked for a peer's self-mask
        seed, the other for its mask key) cannot both exist, and a server that lies about the
        survivor set to some clients never gets both secrets of one peer.
    tensors
        (name, length) of every tensor of an update. Stored sorted by name: order never matters.
    fixed_point
        Encoding; its capacity is checked against ``cohort_size`` here.
    neighbours
        k for the SecAgg+ Harary graph (even), or None for the complete graph.
    active
        Active-adversary mode: Ed25519 signatures on keys and the ConsistencyCheck stage.
    """

    cohort: bytes
    cohort_size: int
    threshold: int
    tensors: tuple[tuple[str, int], ...]
    fixed_point: FixedPoint
    neighbours: int | None = None
    active: bool = False
    _params: bytes = field(init=False, repr=False, compare=False)
    _layout: MaskLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.cohort) <= MAX_COHORT_ID_BYTES:
            raise ValueError(f"cohort must be 1..{MAX_COHORT_ID_BYTES} bytes")
        if not MIN_COHORT_SIZE <= self.cohort_size <= _MAX_ID:
            raise ValueError(
                f"cohort_size must be >= {MIN_COHORT_SIZE}, got {self.cohort_size}: a smaller "
                "session reveals its members' inputs"
            )
        if not 1 <= self.threshold <= self.cohort_size:
            raise ValueError(
                f"threshold must be in [1, cohort_size={self.cohort_size}], got {self.threshold}"
            )
        if self.neighbours is not None:
            if self.neighbours < 2 or self.neighbours % 2:
                raise ValueError(f"neighbours must be even and >= 2, got {self.neighbours}")
            if self.threshold > self.neighbours + 1:
                raise ValueError(
                    f"threshold {self.threshold} exceeds the closed neighbourhood size "
                    f"neighbours + 1 = {self.neighbours + 1}"
                )
        holders = self.share_holders
        if 2 * self.threshold <= holders:
            raise ValueError(
                f"threshold must exceed half of the {holders} share holders of a secret "
                f"(t >= {holders // 2 + 1}), got {self.threshold}: two disjoint sets of "
                "t unmask responses would reveal both secrets of one client"
            )
        tensors = tuple(sorted((str(n), int(m)) for n, m in self.tensors))
        if not tensors:
            raise ValueError("tensors must name at least one tensor")
        names = [n for n, _ in tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensors has duplicate names")
        for name, length in tensors:
            if not 1 <= len(name.encode("utf-8")) <= MAX_TENSOR_NAME_BYTES:
                raise ValueError(f"tensors: name {name!r} must be 1..255 UTF-8 bytes")
            if length < 1:
                raise ValueError(f"tensors: length of {name!r} must be >= 1, got {length}")
        object.__setattr__(self, "tensors", tensors)
        self.fixed_point.check_capacity(self.cohort_size)
        object.__setattr__(self, "_params", self._encode_params())
        object.__setattr__(self, "_layout", mask_layout(tensors))

    @property
    def share_holders(self) -> int:
        """How many clients hold shares of one client's secrets: its closed neighbourhood.

        n for the complete graph (also when k ≥ n − 1, which :func:`graph.harary_neighbours`
        makes complete), k + 1 for SecAgg+.
        """
        if self.neighbours is None or self.neighbours >= self.cohort_size - 1:
            return self.cohort_size
        return self.neighbours + 1

    @property
    def layout(self) -> MaskLayout:
        """Where each tensor's mask lies in a seed's one mask stream (tensors in name order)."""
        return self._layout

    @property
    def params(self) -> bytes:
        """Canonical encoding of the parameters, hashed into the session id."""
        return self._params

    def _encode_params(self) -> bytes:
        fp = self.fixed_point
        parts = [
            LABEL_PARAMS,
            struct.pack(
                "<BIIBbddBIB",
                PROTOCOL_VERSION,
                self.cohort_size,
                self.threshold,
                fp.bits,
                fp.frac_bits,
                fp.clip,
                fp.weight_bound,
                int(fp.per_tensor),
                0 if self.neighbours is None else self.neighbours,
                int(self.active),
            ),
            struct.pack("<I", len(self.tensors)),
        ]
        for name, length in self.tensors:
            encoded = name.encode("utf-8")
            parts.append(struct.pack("<B", len(encoded)) + encoded + struct.pack("<Q", length))
        return b"".join(parts)
