"""Serve an exported causal LM with onnxruntime on the edge: logits, greedy text, bits/byte.

:class:`OrtLM` runs a logits-only graph (see :mod:`estuary.onnx_export`) on the CPU.
Without a KV cache, generation re-runs the whole (growing) sequence each step; for the
byte-level presets and the short completions an edge device serves, that costs less than
maintaining a cache graph and keeps the export a single, simple graph.

Imports neither torch nor onnx: an edge device serving a downloaded export needs only
numpy and onnxruntime. :func:`export_onnx` and :func:`quantize_int8` are re-exported here
for callers that want the whole serving path from one module; they import the export
packages only when called.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from estuary.onnx_export import export_onnx, quantize_int8
from estuary.onnx_meta import (
    TOKENIZER_BYTES,
    ServedMetadata,
    is_served_dir,
    read_metadata,
)

if TYPE_CHECKING:
    from estuary.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

#: Default intra-op threads. Two keeps inference from starving the agent's own training
#: and the device's foreground apps, and is what the edge benchmarks measure; beyond ~4
#: threads the tiny and small presets gain nothing (their matrices are too small to split).
DEFAULT_THREADS = 2

#: Default windows per forward pass in :meth:`OrtLM.bits_per_byte`: 16 × 128 tokens keeps
#: the activations of the small preset under ~100 MB and amortises the per-call overhead.
DEFAULT_EVAL_BATCH = 16

Precision = Literal["auto", "int8", "fp32"]


class OrtLM:
    """A logits-only causal LM graph in an onnxruntime CPU session.

    Parameters
    ----------
    path
        A served directory (from :func:`export_onnx`) or an ``.onnx`` file. For a file,
        metadata is read from its directory when present; without it the tokenizer is the
        byte-level one if the vocabulary has 256 entries, and there is no length limit.
    threads
        Intra-op threads. Execution is sequential (inter-op parallelism off): a
        transformer is a chain of ops, so a second pool would only contend for cores.
    precision
        For a directory: ``"auto"`` serves the int8 graph when there is one, else fp32;
        ``"int8"`` and ``"fp32"`` insist. Ignored for a file.

    Raises
    ------
    ValueError
        If ``threads`` is not positive or ``precision`` unknown, or if the graph or metadata
        is invalid; the message names the file.
    FileNotFoundError
        If ``path`` (or the graph its metadata names) does not exist.

    Attributes
    ----------
    path
        The ``.onnx`` file being served.
    metadata
        The served directory's metadata, or ``None`` for a bare file.
    vocab_size
        Size of the logits' last axis.
    max_positions
        Longest context in tokens, or ``None`` for no limit.
    tokenizer
        The tokenizer, or ``None`` for a bare non-byte-level graph (text generation then
        raises; :meth:`logits` still works).
    """

    def __init__(
        self, path: str | Path, *, threads: int = DEFAULT_THREADS, precision: Precision = "auto"
    ) -> None:
        import onnxruntime as ort

        if threads <= 0:
            raise ValueError(f"threads: must be positive, got {threads}")
        if precision not in ("auto", "int8", "fp32"):
            raise ValueError(f"precision: must be 'auto', 'int8' or 'fp32', got {precision!r}")
        given = Path(path)
        if not given.exists():
            raise FileNotFoundError(f"path: {given} does not exist")
        self.metadata: ServedMetadata | None
        if given.is_dir():
            self.metadata = read_metadata(given)
            self.path = given / _pick_graph(self.metadata, precision=precision, where=given)
            directory = given
        else:
            directory = given.parent
            self.metadata = read_metadata(directory) if is_served_dir(directory) else None
            self.path = given
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: graph named by the metadata is missing")
        self.threads = threads

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exception classes
            raise ValueError(f"{self.path}: not a loadable ONNX graph: {exc}") from exc
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "input_ids" not in inputs or "logits" not in outputs:
            raise ValueError(
                f"{self.path}: expected input 'input_ids' and output 'logits', found "
                f"{sorted(inputs)} -> {sorted(outputs)}"
            )
        vocab_axis = outputs["logits"].shape[-1]
        if self.metadata is not None:
            self.vocab_size = self.metadata.vocab_size
            self.max_positions: int | None = self.metadata.max_positions
            self.tokenizer: Tokenizer | None = _load_tokenizer(directory)
        else:
            if not isinstance(vocab_axis, int):
                raise ValueError(f"{self.path}: logits vocabulary axis is not static")
            self.vocab_size = vocab_axis
            self.max_positions = None
            self.tokenizer = _byte_tokenizer() if vocab_axis == 256 else None
        logger.info(
            "serving %s (vocab %d, max positions %s, %d threads)",
            self.path,
            self.vocab_size,
            self.max_positions,
            threads,
        )

    def logits(self, input_ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Return the logits ``[batch, seq, vocab]`` of ``input_ids`` ``[batch, seq]``.

        Raises
        ------
        ValueError
            If ``input_ids`` is not a non-empty 2-D integer array of ids inside the
            vocabulary, or is longer than ``max_positions``.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"input_ids: need shape (batch>0, seq>0), got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids: need integer token ids, got dtype {ids.dtype}")
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(
                f"input_ids: {ids.shape[1]} tokens exceed the model's {self.max_positions} "
                "positions"
            )
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"input_ids: ids must lie in [0, {self.vocab_size}), found [{low}, {high}]"
            )
        result: Any = self._session.run(["logits"], {"input_ids": ids.astype(np.int64)})[0]
        return np.asarray(result, dtype=np.float32)

    def generate(
        self, prompt: str | bytes, *, max_new_tokens: int = 64, stop_at_eos: bool = True
    ) -> bytes:
        """Return the greedy continuation of ``prompt`` (without the prompt).

        Each step re-runs the graph on the sequence so far and appends the arg-max token.
        When the sequence outgrows ``max_positions``, only its last ``max_positions``
        tokens are fed (a sliding window): the positional table ends there.

        Parameters
        ----------
        prompt
            Text (``str`` is encoded as UTF-8); must yield at least one token.
        max_new_tokens
            Tokens to generate; ≥ 0.
        stop_at_eos
            Stop early at the model's end-of-sequence token, if it has one.

        Raises
        ------
        ValueError
            If the prompt is empty, ``max_new_tokens`` is negative, or the graph has no
            tokenizer.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: no tokenizer known for this graph; use logits()")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("prompt: must contain at least one token")
        eos = self.metadata.eos_token_id if self.metadata is not None and stop_at_eos else None
        new: list[int] = []
        for _ in range(max_new_tokens):
            context = ids[-self.max_positions :] if self.max_positions is not None else ids
            # (1, t) -> (1, t, vocab); only the last position predicts the next token
            last = self.logits(np.asarray([context], dtype=np.int64))[0, -1]
            token = int(np.argmax(last))
            if eos is not None and token == eos:
                break
            ids.append(token)
            new.append(token)
        return self.tokenizer.decode(new)

    def bits_per_byte(
        self, windows: npt.ArrayLike, *, batch_size: int = DEFAULT_EVAL_BATCH
    ) -> float:
        """Return the held-out loss over ``windows`` in bits per byte.

        Position ``t`` of each window predicts token ``t + 1`` from tokens ``≤ t``; the
        summed negative log-likelihood in nats is divided by ln 2 and by the number of
        bytes the predicted tokens cover (one per token for the byte-level presets, and for
        a bare graph without metadata).

        Parameters
        ----------
        windows
            ``[n, seq_len + 1]`` token ids, e.g. :func:`estuary.data.eval_windows`
            (a torch tensor is accepted too).
        batch_size
            Windows per forward pass; bounds memory. It does not change an fp32 result; an
            int8 graph quantises activations with one scale per call over the whole batch,
            so its result moves slightly (≈1e-4 bits/byte) with the batch composition.

        Raises
        ------
        ValueError
            If ``windows`` is not ``[n > 0, seq_len + 1 ≥ 2]`` or ``batch_size`` is not
            positive.
        """
        data = np.asarray(windows)
        if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] < 2:
            raise ValueError(f"windows: need shape (n>0, seq_len+1>=2), got {data.shape}")
        if batch_size <= 0:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        # Byte-level (or unknown, for a bare graph): one predicted token is one byte.
        counter = None if _is_byte_tokenizer(self.metadata) else self.tokenizer
        total_nats = 0.0
        total_bytes = 0
        for start in range(0, data.shape[0], batch_size):
            chunk = data[start : start + batch_size]
            inputs, targets = chunk[:, :-1], chunk[:, 1:].astype(np.int64)
            logits = self.logits(inputs)  # (b, t, vocab)
            # log-softmax, stable: subtract the row max; sum the exponentials in float64 so
            # a large vocabulary does not lose the small terms.
            peak = logits.max(axis=-1, keepdims=True)  # (b, t, 1)
            shifted = logits - peak
            log_norm = np.log(np.exp(shifted).sum(axis=-1, dtype=np.float64))  # (b, t)
            picked = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]  # (b, t)
            total_nats += float((log_norm - picked).sum())
            if counter is None:
                total_bytes += targets.size
            else:
                total_bytes += sum(counter.byte_length(row.tolist()) for row in targets)
        if total_bytes == 0:
            raise ValueError("windows: the predicted tokens cover no bytes")
        return total_nats / math.log(2) / total_bytes


def _pick_graph(metadata: ServedMetadata, *, precision: Precision, where: Path) -> str:
    if precision == "fp32":
        return metadata.fp32
    if metadata.int8 is not None:
        return metadata.int8
    if precision == "int8":
        raise FileNotFoundError(f"{where}: no int8 graph in this served directory")
    return metadata.fp32


def _is_byte_tokenizer(metadata: ServedMetadata | None) -> bool:
    return metadata is None or metadata.tokenizer == TOKENIZER_BYTES


def _byte_tokenizer() -> Tokenizer:
    from estuary.model.tokenizer import ByteTokenizer

    return ByteTokenizer()


def _load_tokenizer(directory: Path) -> Tokenizer:
    # export_onnx writes the model's config.json into every served directory; it names
    # the byte tokenizer for the presets, and the copied tokenizer files serve the rest.
    from estuary.model.tokenizer import load_tokenizer

    return load_tokenizer(directory)


__all__ = ["DEFAULT_THREADS", "OrtLM", "export_onnx", "quantize_int8"]
