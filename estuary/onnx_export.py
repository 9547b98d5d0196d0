"""Export a Hugging Face causal LM to ONNX and quantise it to int8 for the edge.

The graph is logits-only (no KV cache): ``input_ids`` int64 ``[batch, seq]`` in,
``logits`` float32 ``[batch, seq, vocab]`` out, both axes dynamic. It is produced by the
torch.onnx *dynamo* exporter (``torch.export`` underneath), which is the maintained path
for transformers models; the TorchScript exporter is deprecated.

Needs the cloud-side packages ``onnx`` and ``onnxscript`` (the ``worker`` extra) in
addition to torch and transformers. Serving the result needs only onnxruntime
(:mod:`edge_client.serving`).

**Exports run in an exporter process, never in the caller's.** ``torch.export`` keeps
its tracing state process-wide (the dispatch-mode stack, the proxy tracer of symbolic
sizes, patched module hooks): an export that overlaps another export, a trace or a
training step in any other thread of the same process breaks one or both of them
(``Trying to pop empty mode stack``, ``s70 is not tracked with proxy``, a ``KeyError``
in the other thread's backward). A lock would have to be taken by every forward and
backward pass in the process, so instead :func:`export_onnx` and
:func:`export_model_dir` hand the work to a small pool of spawned processes (see
:data:`EXPORT_PROCESSES`), where it runs alone. :func:`quantize_int8` touches only ONNX
and onnxruntime, not torch, and runs in the caller's process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import pickle
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from estuary.model.tokenizer import TOKENIZER_CONFIG_KEY
from estuary.onnx_meta import (
    FP32_FILENAME,
    INT8_FILENAME,
    METADATA_FILENAME,
    TOKENIZER_BYTES,
    TOKENIZER_HF,
    ServedMetadata,
    is_served_dir,
    read_metadata,
    write_metadata,
)

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

#: Sequence length of the example input. Any value ≥ 2 works: torch.export specialises
#: a dimension whose example size is 0 or 1, so 1 would freeze ``seq``; 16 keeps export fast.
EXAMPLE_SEQ_LEN = 16

#: Largest fp32 weight payload written inline. Protobuf caps a message at 2 GiB, so larger
#: models go to an external-data file next to the graph; 1.5 GiB leaves room for the graph.
INLINE_WEIGHT_LIMIT = 3 * 2**29

#: After export the graph is run once on a shape different from the example and compared
#: with torch. fp32 kernels differ only in summation order (measured ~1e-6 on the presets);
#: 1e-3 absolute flags a wrong graph (a specialised axis, a mistranslated op) and nothing else.
VERIFY_ATOL = 1e-3

#: Tokenizer files copied next to the graph for a non-byte-level model: every file name
#: transformers' tokenizers read, so AutoTokenizer can load the served directory.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "generation_config.json",
)

#: Subfolder of a Hugging Face model directory where ``estuary edge infer`` caches its
#: export. Hidden and Estuary-specific because some hub repositories ship their own
#: ``onnx/`` folder, which we must not overwrite.
CACHE_DIRNAME = ".estuary-onnx"

#: Exporter processes at most. Two, so that two callers in one process (two worker groups
#: sharing a process, a local worker beside an export command) export side by side and a
#: third waits; each process is started on first need and then kept, because starting one
#: costs its imports (torch, transformers, onnxscript: ~4 s of CPU) and its first export
#: warms caches the later ones reuse. An idle one holds its imports (~0.6 GB resident).
EXPORT_PROCESSES = 2

#: Seconds between an exporter process's checks that the process that started it still
#: lives. A parent killed with SIGKILL never shuts its pool down; without the check its
#: exporters would idle forever, each holding ~0.6 GB.
PARENT_CHECK_S = 1.0


def _logits_only(model: nn.Module) -> nn.Module:
    """Wrap ``model`` as ``input_ids -> logits`` with the KV cache off (one graph output).

    The class is defined here rather than at module level so that importing this module
    (which :mod:`edge_client.serving` re-exports) does not import torch.
    """
    from torch import nn

    class LogitsOnly(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            # (batch, seq) -> (batch, seq, vocab)
            logits: torch.Tensor = self.inner(input_ids=input_ids, use_cache=False).logits
            return logits

    return LogitsOnly(model)


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _strip_node_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node stack traces and doc strings the dynamo exporter records.

    They are debugging aids that made up ~15 % of the fp32 file of the tiny preset and
    ~35 % of its int8 file; nothing at run time reads them.
    """
    nodes = [*proto.graph.node, *(node for func in proto.functions for node in func.node)]
    for node in nodes:
        del node.metadata_props[:]
        node.doc_string = ""


def export_onnx(
    model: nn.Module,
    out_dir: str | Path,
    *,
    example_batch: int = 2,
    opset: int | None = None,
    source: str | None = None,
    tokenizer_dir: str | Path | None = None,
    verify: bool = True,
    int8: bool = False,
) -> Path:
    """Export a Hugging Face causal LM to a served ONNX directory.

    Writes ``model.onnx`` (logits only, no KV cache; input ``input_ids`` int64
    ``[batch, seq]``, output ``logits`` float32 ``[batch, seq, vocab]``; batch and
    sequence dynamic), the model's ``config.json``, the tokenizer files of a non-byte
    model, and the metadata file (:mod:`estuary.onnx_meta`).

    The export runs in an exporter process (see the module docstring), so it is safe to
    call from any thread of a process that traces, trains or exports elsewhere. The
    model is copied to that process when the call starts (pickled through a pipe to our
    own child, never across a network): the caller's model is never touched, and changes
    made to it during the call do not reach the export.

    Parameters
    ----------
    model
        A float32 Hugging Face causal LM on the CPU (``forward(input_ids=...).logits``).
    out_dir
        Directory to write; created if needed. Existing files of the same names are replaced.
    example_batch
        Batch size of the example input; must be ≥ 2, because torch.export specialises a
        dimension whose example size is 1 and the batch axis would become fixed.
    opset
        ONNX opset; ``None`` takes the exporter's default.
    source
        Where the model came from, recorded in the metadata; ``None`` uses the config's
        ``name_or_path`` or ``"in-memory"``.
    tokenizer_dir
        Directory holding the tokenizer files of a non-byte-level model; ``None`` uses the
        config's ``name_or_path`` when that is a directory.
    verify
        Run the graph once in onnxruntime on a shape different from the example and
        compare with torch (see :data:`VERIFY_ATOL`).
    int8
        Also write the int8 graph (:func:`quantize_int8`), named in the metadata.

    Returns
    -------
    Path
        The fp32 graph ``out_dir / "model.onnx"``.

    Raises
    ------
    ValueError
        If ``example_batch`` < 2, ``opset`` is not positive, the model is not float32 or
        cannot be copied to the exporter process, or a non-byte model has no tokenizer
        files to copy.
    RuntimeError
        If ``verify`` finds the graph disagreeing with torch, or the exporter process died.
    """
    _check_export_args(example_batch=example_batch, opset=opset)
    try:
        payload = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ValueError(f"model: cannot be copied to the exporter process: {exc}") from exc
    path: Path = _run_in_exporter(
        _export_pickled,
        payload,
        Path(out_dir),
        example_batch=example_batch,
        opset=opset,
        source=source,
        tokenizer_dir=tokenizer_dir,
        verify=verify,
        int8=int8,
    )
    return path


def _check_export_args(*, example_batch: int, opset: int | None) -> None:
    """Refuse bad export arguments in the caller, before an exporter process is involved."""
    if example_batch < 2:
        raise ValueError(
            f"example_batch: must be >= 2, got {example_batch} (torch.export specialises a "
            "size-1 example dimension, so the exported batch axis would be fixed)"
        )
    if opset is not None and opset <= 0:
        raise ValueError(f"opset: must be positive or None, got {opset}")


def _export_pickled(payload: bytes, out_dir: Path, **kwargs: Any) -> Path:
    """Exporter-process side of :func:`export_onnx`: unpickle the model, export it."""
    model: nn.Module = pickle.loads(payload)  # our own parent's bytes, see export_onnx
    return _export_here(model, out_dir, **kwargs)


def _export_here(
    model: nn.Module,
    out_dir: str | Path,
    *,
    example_batch: int,
    opset: int | None,
    source: str | None,
    tokenizer_dir: str | Path | None,
    verify: bool,
    int8: bool,
) -> Path:
    """Run :func:`export_onnx` in this process; only an exporter process calls this."""
    import onnx
    import torch

    _check_export_args(example_batch=example_batch, opset=opset)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(
            f"model: export needs float32 weights, found {sorted(str(d) for d in dtypes)}; "
            "call model.float() first"
        )
    config: Any = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: not a Hugging Face model (no .config)")
    vocab_size = _config_int(config, "vocab_size")
    if vocab_size is None:
        raise ValueError("model: config has no positive vocab_size")
    max_positions = _config_int(config, "max_position_embeddings", "n_positions", "n_ctx")
    if max_positions is not None and max_positions < 2:
        raise ValueError(f"model: max positions {max_positions} is too short to export")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name_or_path = str(getattr(config, "name_or_path", "") or "")
    tokenizer_kind = (
        TOKENIZER_BYTES
        if getattr(config, TOKENIZER_CONFIG_KEY, None) == TOKENIZER_BYTES
        else TOKENIZER_HF
    )
    if tokenizer_kind == TOKENIZER_HF:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else Path(name_or_path)
        copied = _copy_tokenizer_files(tok_dir, out) if name_or_path or tokenizer_dir else []
        if not any(name in copied for name in ("tokenizer.json", "tokenizer_config.json")):
            raise ValueError(
                f"tokenizer_dir: {tok_dir} has no tokenizer.json or tokenizer_config.json; a "
                "model that is not byte-level needs its tokenizer to be served"
            )

    example_seq = min(EXAMPLE_SEQ_LEN, max_positions or EXAMPLE_SEQ_LEN)
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, vocab_size, (example_batch, example_seq), generator=generator)
    batch_dim = torch.export.Dim("batch", min=1)
    seq_dim = (
        torch.export.Dim("seq", min=1, max=max_positions)
        if max_positions is not None
        else torch.export.Dim("seq", min=1)
    )
    wrapper = _logits_only(model)
    was_training = model.training
    # Eval mode for the trace and for the check against torch: dropout would make both
    # the graph and the comparison random.
    model.eval()
    wrapper.eval()
    try:
        proto = _export_proto(wrapper, example, batch_dim=batch_dim, seq_dim=seq_dim, opset=opset)
        onnx_path = out / FP32_FILENAME
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        external = weight_bytes > INLINE_WEIGHT_LIMIT
        onnx.save_model(
            proto,
            str(onnx_path),
            save_as_external_data=external,
            location=FP32_FILENAME + ".data" if external else None,
        )
        if verify:
            _verify(
                model,
                onnx_path,
                vocab_size=vocab_size,
                max_positions=max_positions,
                example_batch=example_batch,
                example_seq=example_seq,
            )
    finally:
        model.train(was_training)
    model_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    config.to_json_file(str(out / "config.json"))
    eos = getattr(config, "eos_token_id", None)
    # Some configs list several end tokens; greedy decoding stops at the first listed.
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    metadata = ServedMetadata(
        tokenizer=tokenizer_kind,
        vocab_size=vocab_size,
        max_positions=max_positions,
        source=source if source is not None else (name_or_path or "in-memory"),
        model_type=str(getattr(config, "model_type", "unknown")),
        opset=int(model_opset),
        fp32=FP32_FILENAME,
        int8=None,
        eos_token_id=eos if isinstance(eos, int) else None,
    )
    write_metadata(out, metadata)
    logger.info("wrote %s (%d bytes)", onnx_path, onnx_path.stat().st_size)
    if int8:
        quantize_int8(onnx_path, out / INT8_FILENAME)
    return onnx_path


def _export_proto(
    wrapper: nn.Module,
    example: torch.Tensor,
    *,
    batch_dim: Any,
    seq_dim: Any,
    opset: int | None,
) -> onnx.ModelProto:
    """Run the dynamo exporter on ``wrapper`` and return the stripped ONNX model."""
    import torch

    logger.info(
        "exporting to ONNX (example %s, opset %s)",
        tuple(example.shape),
        opset if opset is not None else "default",
    )
    with torch.no_grad(), _quiet_third_party_logs(), warnings.catch_warnings():
        # torch.export's own use of a deprecated pytree API; nothing the caller can fix.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch_dim, 1: seq_dim}},
            opset_version=opset,
            verbose=False,
        )
    if program is None:  # only None for the legacy exporter; guards the type
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    _strip_node_metadata(proto)
    return proto


def _copy_tokenizer_files(source: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        path = source / name
        if path.is_file():
            shutil.copy2(path, out / name)
            copied.append(name)
    return copied


def _verify(
    model: nn.Module,
    onnx_path: Path,
    *,
    vocab_size: int,
    max_positions: int | None,
    example_batch: int,
    example_seq: int,
) -> None:
    """Compare onnxruntime with torch on a batch and length unlike the example."""
    import onnxruntime as ort
    import torch

    seq = example_seq + 3 if max_positions is None else min(example_seq + 3, max_positions)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (example_batch + 1, seq), generator=generator)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.numpy()
    error = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    logger.info("ONNX vs torch on %s: max |Δlogit| = %.2e", tuple(ids.shape), error)
    if error > VERIFY_ATOL:
        raise RuntimeError(
            f"{onnx_path}: exported graph disagrees with torch on input {tuple(ids.shape)}: "
            f"shape {got.shape} vs {want.shape}, max |Δlogit| {error:.3g} > {VERIFY_ATOL}"
        )


@contextlib.contextmanager
def _quiet_third_party_logs() -> Iterator[None]:
    """Keep the exporter's and quantiser's chatter out of our logs while they run.

    onnxscript and onnx_ir log every rewrite rule at INFO, and onnxruntime's quantiser logs
    through the *root* logger (one INFO line per tensor it skips, and a WARNING to run its
    pre-processing first). At the CLI's default INFO level that is hundreds of lines per
    export. Their warnings and errors still pass; only the root logger's INFO lines and the
    pre-processing hint are dropped, plus the exporter's op-registry warnings that
    torchvision is not installed (its detection ops never occur in a language model).

    We skip ``quant_pre_process`` on purpose: on the dynamo export of the tiny preset it
    gave a bit-identical int8 graph and no speed-up, for +1.4 s of work per export.
    """

    class _RootChatter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno < logging.WARNING:
                return False
            return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    chatter = _RootChatter()
    floors = {
        "onnxscript": logging.WARNING,
        "onnx_ir": logging.WARNING,
        "torch.onnx._internal.exporter._registration": logging.ERROR,
    }
    noisy = {name: logging.getLogger(name) for name in floors}
    saved = {name: noisy_logger.level for name, noisy_logger in noisy.items()}
    root.addFilter(chatter)
    for name, noisy_logger in noisy.items():
        noisy_logger.setLevel(max(noisy_logger.getEffectiveLevel(), floors[name]))
    try:
        yield
    finally:
        root.removeFilter(chatter)
        for name, noisy_logger in noisy.items():
            noisy_logger.setLevel(saved[name])


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
) -> Path:
    """Quantise an fp32 ONNX graph to int8 weights with onnxruntime's dynamic quantisation.

    Weights of every MatMul (projections, MLP, LM head) and of the embedding Gather are
    stored as int8; activations are quantised to uint8 on the fly, so no calibration data
    is needed. The activation scale is one per tensor per call, taken over the whole batch,
    so an int8 result depends slightly on what else is in the batch (≈1e-4 bits/byte on
    the tiny preset between batches of 5 and 16 windows).

    If ``out_path`` lies in a served directory whose metadata names no int8 graph yet,
    the metadata is updated to name it (so the directory serves it by default).

    Parameters
    ----------
    onnx_path
        The fp32 graph.
    out_path
        Where to write the int8 graph.
    per_channel
        One scale per output channel instead of one per tensor. Rows of a transformer
        projection differ in range by an order of magnitude, so a per-tensor scale wastes
        most of the 8 bits on the small rows; per-channel keeps each row's resolution at
        the cost of one float per row.
    reduce_range
        Use 7-bit weights (the default). The graph is built where the model is and run
        on devices whose CPU is unknown here: on x86 CPUs without VNNI (AVX2 only, e.g.
        AMD before Zen 4), onnxruntime's u8×s8 kernel adds pairs of products in 16 bits,
        which 8-bit weights overflow. Measured on such a CPU (AMD EPYC, AVX2), tiny
        model: max |Δlogit| against torch 0.118 with 8-bit weights, where a VNNI CPU
        gives 0.004. Seven bits cannot overflow there and cost a VNNI CPU little
        accuracy; ``False`` only for graphs that run on VNNI or ARM CPUs alone.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    FileNotFoundError
        If ``onnx_path`` does not exist.
    ValueError
        If ``onnx_path`` and ``out_path`` are the same file.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(onnx_path)
    dst = Path(out_path)
    if not src.is_file():
        raise FileNotFoundError(f"onnx_path: {src} does not exist")
    if src.resolve() == dst.resolve():
        raise ValueError(f"out_path: {dst} is the input graph; write the int8 graph elsewhere")
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = (src.parent / (src.name + ".data")).is_file()
    with _quiet_third_party_logs():
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
            op_types_to_quantize=["MatMul", "Gather"],
            use_external_data_format=external,
        )
    if is_served_dir(dst.parent):
        metadata = read_metadata(dst.parent)
        if metadata.int8 is None:
            write_metadata(dst.parent, metadata.with_int8(dst.name))
    logger.info(
        "quantised %s (%d bytes) -> %s (%d bytes)",
        src,
        src.stat().st_size,
        dst,
        dst.stat().st_size,
    )
    return dst


def source_fingerprint(model_dir: str | Path) -> str:
    """Return a digest of a model directory's config, weight and tokenizer files.

    Names, sizes and modification times, not contents: hashing gigabytes of weights on
    every ``infer`` would cost more than the inference. Any rewrite of a file changes it.
    """
    path = Path(model_dir)
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and (file.suffix in (".json", ".safetensors", ".model", ".txt")):
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def export_model_dir(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    int8: bool = True,
    example_batch: int = 2,
    opset: int | None = None,
) -> ServedMetadata:
    """Load a Hugging Face model directory and write a served ONNX directory from it.

    Loading and export both run in an exporter process (see the module docstring): the
    calling process neither holds the model nor shares torch state with the export.

    Parameters
    ----------
    model_dir
        Directory saved with ``save_pretrained`` (safetensors weights).
    out_dir
        Served directory to write.
    int8
        Also write the int8 graph.
    example_batch, opset
        As in :func:`export_onnx`.

    Returns
    -------
    ServedMetadata
        The metadata written, with the source fingerprint set.

    Raises
    ------
    estuary.model.loading.CheckpointError
        If the directory is not a loadable model (a ``ValueError``; names the file).
    """
    _check_export_args(example_batch=example_batch, opset=opset)
    metadata: ServedMetadata = _run_in_exporter(
        _export_model_dir_here,
        Path(model_dir),
        Path(out_dir),
        int8=int8,
        example_batch=example_batch,
        opset=opset,
    )
    return metadata


def _export_model_dir_here(
    source: Path, out: Path, *, int8: bool, example_batch: int, opset: int | None
) -> ServedMetadata:
    """Exporter-process side of :func:`export_model_dir`: load, export, fingerprint."""
    from estuary.model.loading import load_model

    model: nn.Module = load_model(source)
    model.float()
    _export_here(
        model,
        out,
        example_batch=example_batch,
        opset=opset,
        source=str(source.resolve()),
        tokenizer_dir=source,
        verify=True,
        int8=int8,
    )
    metadata = read_metadata(out)
    fingerprinted = dataclasses.replace(metadata, source_fingerprint=source_fingerprint(source))
    write_metadata(out, fingerprinted)
    return fingerprinted


def cached_export(
    model_dir: str | Path, *, cache_dir: str | Path | None = None, int8: bool = True
) -> tuple[Path, bool]:
    """Return a served directory for Hugging Face model directory ``model_dir``.

    The export lives in ``cache_dir`` (default ``model_dir / CACHE_DIRNAME``) and is
    redone when missing, when it lacks the int8 graph asked for, or when the source
    fingerprint changed.

    Returns
    -------
    tuple[Path, bool]
        The served directory and whether it was (re-)exported by this call.
    """
    source = Path(model_dir)
    cache = Path(cache_dir) if cache_dir is not None else source / CACHE_DIRNAME
    if is_served_dir(cache):
        try:
            metadata = read_metadata(cache)
        except ValueError:
            logger.warning("%s: unreadable cached metadata; exporting again", cache)
        else:
            fresh = metadata.source_fingerprint == source_fingerprint(source)
            if fresh and (not int8 or metadata.int8 is not None):
                return cache, False
    export_model_dir(source, cache, int8=int8)
    return cache, True


# ---------------------------------------------------------------- exporter processes

_pool_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
#: True inside an exporter process, which runs one call at a time in its main thread and
#: nothing else: work handed to the exporter from there runs in place.
_in_exporter_process = False


def _run_in_exporter(target: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``target(*args, **kwargs)`` in an exporter process and return its result.

    ``target`` is a module-level function (spawned processes import it by name); it and
    its arguments are pickled. Exceptions it raises are re-raised here with their type.
    Records it logs under ``estuary.*`` at this process's level are logged again here,
    under the same logger names, so they reach this process's handlers with its context
    fields. A pool whose process died (killed, out of memory) is replaced and the call
    tried once more in a fresh process, so that a call of another thread that was
    waiting on the same pool does not fail with it.

    Raises
    ------
    RuntimeError
        If the exporter process died on both tries.
    """
    if _in_exporter_process:
        return target(*args, **kwargs)
    torch = sys.modules.get("torch")
    # The caller's intra-op thread budget holds for its export too (a worker group limits
    # itself to one thread so that groups sharing the cores do not oversubscribe them).
    threads = torch.get_num_threads() if torch is not None else None
    level = logging.getLogger("estuary").getEffectiveLevel()
    for attempt in (1, 2):
        pool = _exporter_pool()
        try:
            result, records = pool.submit(
                _exporter_call, target, args, kwargs, threads=threads, level=level
            ).result()
        except BrokenProcessPool as exc:
            _discard_pool(pool)
            if attempt == 2:
                raise RuntimeError(
                    f"ONNX export ({target.__name__}): the exporter process died twice "
                    "(killed, or out of memory)"
                ) from exc
            logger.warning("ONNX export: the exporter process died; retrying in a new one")
            continue
        for name, levelno, message in records:
            logging.getLogger(name).log(levelno, "%s", message)
        return result
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _exporter_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn, never fork: a forked child would inherit this process's torch state
            # (and the locks other threads hold at the moment of the fork).
            _pool = ProcessPoolExecutor(
                max_workers=EXPORT_PROCESSES,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exporter_init,
                initargs=(os.getpid(),),
            )
        return _pool


def _forget_pool_after_fork() -> None:
    # A forked child has none of the pool's threads or processes; it starts its own.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _discard_pool(pool: ProcessPoolExecutor) -> None:
    """Forget a broken pool (once, however many threads saw it break)."""
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def _exporter_init(parent_pid: int) -> None:
    """Set up an exporter process: mark it, and exit once its parent is gone."""
    global _in_exporter_process
    _in_exporter_process = True

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)  # orphaned: nobody is left to hand work or read a result

    threading.Thread(target=watch_parent, name="exporter-parent-watch", daemon=True).start()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _exporter_call(
    target: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    threads: int | None,
    level: int,
) -> tuple[Any, list[tuple[str, int, str]]]:
    """Exporter-process side of :func:`_run_in_exporter`."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    collect = _Collect()
    ours = logging.getLogger("estuary")
    ours.setLevel(level)
    ours.addHandler(collect)
    # Collected only: the parent logs them in its own format. Propagated, they also reached
    # a root handler the exporter libraries install here (Python's default format, on the
    # shared standard error, past the coordinator's --log-json).
    ours.propagate = False
    try:
        result = target(*args, **kwargs)
    finally:
        ours.removeHandler(collect)
        ours.propagate = True
    return result, collect.records


__all__ = [
    "CACHE_DIRNAME",
    "METADATA_FILENAME",
    "cached_export",
    "export_model_dir",
    "export_onnx",
    "quantize_int8",
    "source_fingerprint",
]
