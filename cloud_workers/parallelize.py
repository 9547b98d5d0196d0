"""Split a single-device Hugging Face causal LM into pipeline stages.

The model code stays the one-device ``LlamaForCausalLM`` (or any Llama-style model with
``model.embed_tokens``, ``model.layers``, ``model.rotary_emb``, ``model.norm`` and
``lm_head``). This module applies the parallelism on top, in a fixed order:

1. :func:`init_distributed` creates the process group (gloo on CPU, NCCL on CUDA) with
   the configured timeout, so a dead peer fails every collective instead of hanging it.
2. :func:`split_model` keeps only this rank's part of the model in a :class:`StageModule`
   (embedding + first layers / middle layers / last layers + norm + LM head). Rotary
   position embeddings and the causal mask are recomputed inside every stage from the
   activations' shape, so only the hidden states cross stage boundaries.
3. :class:`PipelineRunner` wraps the stage in ``torch.distributed.pipelining``
   (``PipelineStage`` + ``ScheduleGPipe`` or ``Schedule1F1B``) with micro-batches.

All rank arithmetic is in :class:`~cloud_workers.topology.Topology`.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from cloud_workers.topology import Topology

__all__ = [
    "PipelineRunner",
    "StageModule",
    "broadcast_bytes",
    "init_distributed",
    "pipeline_bits_per_byte",
    "resolve_backend",
    "split_model",
]

logger = logging.getLogger(__name__)

ScheduleName = Literal["gpipe", "1f1b"]


def resolve_backend(backend: str) -> str:
    """Return the torch.distributed backend for ``backend`` (``auto`` picks by CUDA).

    Raises
    ------
    ValueError
        If ``backend`` is not ``auto``, ``gloo`` or ``nccl``, or NCCL is asked for
        without CUDA.
    """
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in {"gloo", "nccl"}:
        raise ValueError(f"backend: must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend: 'nccl' needs CUDA, which is not available here")
    return backend


def device_for(topology: Topology, *, backend: str) -> torch.device:
    """Return the device this rank computes on: its local GPU under NCCL, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", topology.device_index)
    return torch.device("cpu")


def init_distributed(
    topology: Topology,
    *,
    backend: str,
    timeout_s: float,
    init_method: str = "env://",
) -> torch.device:
    """Join this rank's process group and return the device it computes on.

    Parameters
    ----------
    topology
        This rank's view of the group.
    backend
        ``auto``, ``gloo`` or ``nccl`` (see :func:`resolve_backend`).
    timeout_s
        Collective timeout. A peer that died leaves its partners blocked in a send or
        receive; after this many seconds they fail with an error instead of hanging the
        group forever, so a supervisor can restart it and the jobs get reclaimed.
    init_method
        Rendezvous URL; ``env://`` reads torchrun's ``MASTER_ADDR``/``MASTER_PORT``.

    Raises
    ------
    ValueError
        If ``timeout_s`` is not positive or the backend is invalid.
    """
    if not timeout_s > 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s: must be a positive number of seconds, got {timeout_s!r}")
    name = resolve_backend(backend)
    device = device_for(topology, backend=name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=name,
            init_method=init_method,
            rank=topology.rank,
            world_size=topology.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    logger.info(
        "rank %d/%d joined the %s group (stage layers %s, timeout %.0f s)",
        topology.rank,
        topology.world_size,
        name,
        list(topology.my_layers),
        timeout_s,
    )
    return device


class StageModule(nn.Module):
    """One pipeline stage of a Llama-style causal LM.

    The first stage maps token ids ``(b, t)`` to hidden states ``(b, t, hidden)``, the
    middle ones map hidden states to hidden states, the last maps hidden states to logits
    ``(b, t, vocab)`` (a one-stage split maps ids to logits).

    Parameters
    ----------
    model
        The full single-device causal LM. Its submodules are shared, not copied: keep
        only the stage (drop the model) to free the rest.
    topology
        Which layers this stage holds.
    """

    def __init__(self, model: nn.Module, topology: Topology) -> None:
        super().__init__()
        inner = _inner_model(model)
        layers = inner.layers
        if len(layers) != topology.num_layers:
            raise ValueError(
                f"topology: num_layers={topology.num_layers} but the model has {len(layers)}"
            )
        self.config: Any = model.config
        self.is_first = topology.is_first
        self.is_last = topology.is_last
        self.embed_tokens: nn.Module | None = inner.embed_tokens if self.is_first else None
        self.layers = nn.ModuleList([layers[i] for i in topology.my_layers])
        # Rotary embeddings hold only the inverse-frequency buffer; every stage recomputes
        # cos/sin for its activations instead of shipping them across the boundary.
        self.rotary_emb = inner.rotary_emb
        self.norm: nn.Module | None = inner.norm if self.is_last else None
        self.lm_head: nn.Module | None = getattr(model, "lm_head") if self.is_last else None  # noqa: B009

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run this stage: ids or hidden states in, hidden states or logits out."""
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x  # (b, t, d)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, t)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        if self.norm is not None and self.lm_head is not None:
            hidden = self.lm_head(self.norm(hidden))  # (b, t, d) -> (b, t, vocab)
        return hidden


def _inner_model(model: nn.Module) -> Any:
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "rotary_emb", "norm")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        raise ValueError(
            "model: not a Llama-style causal LM (needs model.embed_tokens, model.layers, "
            "model.rotary_emb, model.norm and lm_head)"
        )
    return inner


def split_model(model: nn.Module, topology: Topology) -> StageModule:
    """Return this rank's :class:`StageModule` of ``model``.

    Raises
    ------
    ValueError
        If the model is not Llama-style or its depth differs from the topology's.
    """
    return StageModule(model, topology)


def num_layers_of(model: nn.Module) -> int:
    """Return the number of decoder layers of a Llama-style causal LM."""
    return len(_inner_model(model).layers)


class PipelineRunner:
    """Runs a :class:`StageModule` as one stage of a ``torch.distributed.pipelining`` schedule.

    Every rank of the group must make the same calls in the same order; only rank 0
    passes inputs and only the last rank gets outputs.

    Parameters
    ----------
    stage_module
        This rank's stage, already on ``device``.
    topology
        The group's layout.
    device
        Where the stage computes.
    micro_batches
        Micro-batches per batch; a batch must hold at least this many rows.
    schedule
        ``gpipe`` (all forwards, then all backwards) or ``1f1b`` (interleaved: less
        activation memory, same result).
    loss_fn
        ``loss_fn(logits, targets) -> scalar`` for :meth:`train_step`; ``None``: the
        mean next-token cross-entropy.
    """

    def __init__(
        self,
        stage_module: StageModule,
        *,
        topology: Topology,
        device: torch.device,
        micro_batches: int,
        schedule: ScheduleName = "gpipe",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int):
            raise ValueError(f"micro_batches: must be an int >= 1, got {micro_batches!r}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches: must be an int >= 1, got {micro_batches!r}")
        if schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"schedule: must be 'gpipe' or '1f1b', got {schedule!r}")
        self.topology = topology
        self.device = device
        self.micro_batches = micro_batches
        self._stage_module = stage_module
        self._schedule_cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self._stage_cls = PipelineStage
        self._loss_fn = loss_fn or next_token_loss
        # Forward-only and training runs get separate stages and schedules: a schedule
        # with a loss function expects targets on every step, and a stage fixes whether
        # it keeps activations for a backward pass the first time it runs.
        self._eval: Any = None
        self._train: Any = None

    def _new_stage(self) -> Any:
        # A PipelineStage belongs to one schedule, so training and evaluation each get one.
        return self._stage_cls(
            self._stage_module,
            self.topology.stage,
            self.topology.stages,
            self.device,
            group=dist.group.WORLD,
        )

    def _schedule(self, *, train: bool) -> Any:
        if train and self._train is None:
            self._train = self._schedule_cls(
                self._new_stage(), n_microbatches=self.micro_batches, loss_fn=self._loss_fn
            )
        if not train and self._eval is None:
            self._eval = self._schedule_cls(self._new_stage(), n_microbatches=self.micro_batches)
        return self._train if train else self._eval

    def _check_batch(self, batch: torch.Tensor | None) -> None:
        if not self.topology.is_first:
            return
        if batch is None or batch.ndim != 2 or batch.shape[0] < self.micro_batches:
            shape = None if batch is None else tuple(batch.shape)
            raise ValueError(
                f"batch: rank 0 needs (b >= micro_batches={self.micro_batches}, t) "
                f"token ids, got {shape}"
            )

    @torch.no_grad()
    def forward(self, batch: torch.Tensor | None) -> torch.Tensor | None:
        """Run a forward pass; return the logits ``(b, t, vocab)`` on the last rank.

        Parameters
        ----------
        batch
            ``(b, t)`` int64 token ids on rank 0; ``None`` elsewhere.
        """
        self._check_batch(batch)
        if self.topology.is_first:
            assert batch is not None
            out = self._schedule(train=False).eval(batch.to(self.device))
        else:
            out = self._schedule(train=False).eval()
        return out if self.topology.is_last else None

    def train_step(
        self, batch: torch.Tensor | None, targets: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Run forward and backward; gradients accumulate in this stage's parameters.

        The loss of each micro-batch is scaled by ``1 / micro_batches``, so with equal
        micro-batches the gradients equal those of the mean loss over the whole batch.

        Parameters
        ----------
        batch
            ``(b, t)`` token ids on rank 0; ``None`` elsewhere.
        targets
            ``(b, t)`` next-token ids on the last rank; ``None`` elsewhere.

        Returns
        -------
        torch.Tensor | None
            The mean of the micro-batch losses on the last rank, else ``None``.
        """
        self._check_batch(batch)
        args = (batch.to(self.device),) if self.topology.is_first and batch is not None else ()
        if self.topology.is_last:
            if targets is None:
                raise ValueError("targets: the last rank needs the (b, t) targets")
            losses: list[torch.Tensor] = []
            self._schedule(train=True).step(*args, target=targets.to(self.device), losses=losses)
            return torch.stack([loss.detach() for loss in losses]).mean()
        self._schedule(train=True).step(*args)
        return None


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(b, t, vocab)`` logits against ``(b, t)`` targets."""
    # (b, t, vocab) -> (b * t, vocab) against (b * t,)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    )


def broadcast_bytes(data: bytes | None, *, src: int, device: torch.device) -> bytes:
    """Send ``data`` from rank ``src`` to every rank of the group; return it everywhere.

    Commands between the ranks of a group are serialised protobuf or JSON bytes, never
    pickled objects (``broadcast_object_list`` would unpickle whatever arrives).
    """
    rank = dist.get_rank()
    length = torch.zeros(1, dtype=torch.int64, device=device)
    if rank == src:
        if data is None:
            raise ValueError("data: the source rank must pass bytes")
        length[0] = len(data)
    dist.broadcast(length, src=src)
    size = int(length.item())
    if rank == src:
        assert data is not None
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if size else None
    else:
        buffer = torch.empty(size, dtype=torch.uint8, device=device) if size else None
    if buffer is None:
        return b""
    dist.broadcast(buffer, src=src)
    return bytes(buffer.cpu().numpy().tobytes())


def pipeline_bits_per_byte(
    runner: PipelineRunner, windows: torch.Tensor | None, *, batch_size: int
) -> float:
    """Return held-out bits per byte of the pipelined model, on every rank.

    Same quantity as :func:`estuary.model.evaluate.bits_per_byte`: mean next-token
    cross-entropy over every predicted position, in bits. Rank 0 holds the windows; the
    window count and every batch shape are broadcast so the other ranks run the same
    schedule steps. The last batch is padded with copies of its last window (a pipeline
    stage has fixed micro-batch shapes) and the padding is not counted.

    Parameters
    ----------
    runner
        This rank's pipeline runner.
    windows
        ``(n, seq_len + 1)`` int64 token ids on rank 0; ``None`` elsewhere.
    batch_size
        Windows per pipeline step; a multiple of ``runner.micro_batches``.

    Raises
    ------
    ValueError
        If ``batch_size`` is not a positive multiple of the micro-batch count, or rank 0's
        windows are not a non-empty ``(n, >=2)`` tensor.
    """
    topology = runner.topology
    if batch_size < 1 or batch_size % runner.micro_batches:
        raise ValueError(
            f"batch_size: must be a positive multiple of micro_batches={runner.micro_batches}, "
            f"got {batch_size}"
        )
    shape = torch.zeros(2, dtype=torch.int64, device=runner.device)
    if topology.is_first:
        if windows is None or windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
            got = None if windows is None else tuple(windows.shape)
            raise ValueError(f"windows: need shape (n>0, seq_len+1>=2), got {got}")
        shape[0], shape[1] = windows.shape[0], windows.shape[1]
    dist.broadcast(shape, src=0)
    count, span = int(shape[0]), int(shape[1])
    totals = torch.zeros(2, dtype=torch.float64, device=runner.device)  # (nats, tokens)
    for start in range(0, count, batch_size):
        real = min(batch_size, count - start)
        inputs: torch.Tensor | None = None
        targets: torch.Tensor | None = None
        if topology.is_first and windows is not None:
            chunk = windows[start : start + real]
            if real < batch_size:  # pad with copies of the last window; not counted below
                chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - real, span)])
            inputs = chunk[:, :-1]
            targets = chunk[:, 1:]
        if topology.is_last:
            # The last stage needs the targets; it never saw the windows, so rank 0 sends
            # them (same bytes as the inputs shifted by one).
            targets = _send_targets(
                targets, topology=topology, device=runner.device, span=span, batch_size=batch_size
            )
        elif topology.is_first:
            _send_targets(
                targets, topology=topology, device=runner.device, span=span, batch_size=batch_size
            )
        logits = runner.forward(inputs)
        if topology.is_last and logits is not None and targets is not None:
            loss = nn.functional.cross_entropy(
                logits[:real].reshape(-1, logits.shape[-1]).float(),
                targets[:real].reshape(-1),
                reduction="sum",
            )
            totals[0] += float(loss)
            totals[1] += targets[:real].numel()
    dist.broadcast(totals, src=topology.last_rank)
    return float(totals[0] / totals[1]) / math.log(2)


def _send_targets(
    targets: torch.Tensor | None,
    *,
    topology: Topology,
    device: torch.device,
    span: int,
    batch_size: int,
) -> torch.Tensor:
    """Move rank 0's ``(batch, span - 1)`` targets to the last rank (a no-op for 1 stage)."""
    if topology.stages == 1:
        assert targets is not None
        return targets.to(device)
    if topology.is_first:
        assert targets is not None
        dist.send(targets.contiguous().to(device), dst=topology.last_rank)
        return targets
    buffer = torch.empty(batch_size, span - 1, dtype=torch.int64, device=device)
    dist.recv(buffer, src=0)
    return buffer
