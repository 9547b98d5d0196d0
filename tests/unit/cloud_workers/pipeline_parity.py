"""Shared body of the pipeline parity tests (CPU/gloo here, CUDA/NCCL in tests/gpu).

Each rank of a 2-stage group and the single-process reference build the same model
(tiny preset + a LoRA adapter with a non-zero global B), so any difference in logits,
bits/byte or adapter gradients comes from the pipeline split alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cloud_workers.parallelize import (
    PipelineRunner,
    init_distributed,
    next_token_loss,
    pipeline_bits_per_byte,
    split_model,
)
from cloud_workers.topology import Topology

SEQ_LEN = 32
#: 4 rows = 2 micro-batches of 2; 6 eval windows with batch 4 also exercises padding.
BATCH = 4
EVAL_WINDOWS = 6
MICRO_BATCHES = 2


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago (for the rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_model(device: torch.device) -> torch.nn.Module:
    """Return the tiny preset with a non-trivial adapter attached, on ``device``."""
    from estuary.adapters.lora import AdapterConfig, GlobalAdapter, attach_adapters
    from estuary.model.presets import build_preset

    model = build_preset("tiny", seed=0)
    adapter = GlobalAdapter.for_model(model, AdapterConfig(r_max=4, seed=1))
    rng = np.random.default_rng(7)
    adapter = adapter.with_b(
        {n: rng.normal(0, 0.05, v.shape).astype(np.float32) for n, v in adapter.b.items()}
    )
    attach_adapters(model, adapter, rank=4)
    # Non-zero deltas so the trainable parameters influence the forward pass too.
    gen = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_delta" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return model.to(device)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(batch windows (BATCH, SEQ_LEN+1), eval windows (EVAL_WINDOWS, SEQ_LEN+1))``."""
    gen = torch.Generator().manual_seed(11)
    batch = torch.randint(0, 256, (BATCH, SEQ_LEN + 1), generator=gen)
    windows = torch.randint(0, 256, (EVAL_WINDOWS, SEQ_LEN + 1), generator=gen)
    return batch, windows


def reference(device: torch.device) -> dict[str, torch.Tensor]:
    """Single-process logits, bits/byte and adapter gradients."""
    from estuary.model.evaluate import bits_per_byte

    model = build_model(device)
    batch, windows = data()
    batch, windows = batch.to(device), windows.to(device)
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    bpb = bits_per_byte(model, windows, batch_size=BATCH)
    model.train()
    loss = next_token_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:])
    loss.backward()
    out = {"logits": logits.cpu(), "bpb": torch.tensor([bpb], dtype=torch.float64)}
    for name, param in model.named_parameters():
        if param.grad is not None:
            out[f"grad/{name}"] = param.grad.cpu()
    return out


def run_rank(rank: int, init_method: str, out_dir: str, backend: str) -> None:
    """Body of one rank: forward, bits/byte and a backward pass per schedule; save results."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # two ranks on a 2-core runner: one intra-op thread each
    topology = Topology(world_size=2, stages=2, num_layers=4, rank=rank)
    device = init_distributed(topology, backend=backend, timeout_s=60.0, init_method=init_method)
    model = build_model(device)
    names = {id(p): n for n, p in model.named_parameters()}
    stage = split_model(model, topology).to(device)
    batch, windows = data()
    out: dict[str, torch.Tensor] = {}
    for schedule in ("gpipe", "1f1b"):
        stage.zero_grad(set_to_none=True)
        stage.train()
        runner = PipelineRunner(
            stage,
            topology=topology,
            device=device,
            micro_batches=MICRO_BATCHES,
            schedule=schedule,  # type: ignore[arg-type]
        )
        first = topology.is_first
        logits = runner.forward(batch[:, :-1] if first else None)
        if logits is not None:
            out[f"{schedule}/logits"] = logits.cpu()
        bpb = pipeline_bits_per_byte(runner, windows if first else None, batch_size=BATCH)
        out[f"{schedule}/bpb"] = torch.tensor([bpb], dtype=torch.float64)
        runner.train_step(
            batch[:, :-1] if first else None, batch[:, 1:] if topology.is_last else None
        )
        for param in stage.parameters():
            if param.grad is not None:
                out[f"{schedule}/grad/{names[id(param)]}"] = param.grad.detach().cpu().clone()
    save_file(out, str(Path(out_dir) / f"rank{rank}.safetensors"))
    import torch.distributed as dist

    dist.destroy_process_group()
