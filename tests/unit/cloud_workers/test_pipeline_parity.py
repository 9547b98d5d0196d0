"""Pipeline parity on CPU: 2 stages in 2 gloo processes vs the single-process model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pipeline_parity import free_port, reference, run_rank


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("parity")
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(run_rank, args=(init, str(out), "gloo"), nprocs=2, join=True)
    return {
        "ref": reference(torch.device("cpu")),
        "rank0": load_file(str(Path(out) / "rank0.safetensors")),
        "rank1": load_file(str(Path(out) / "rank1.safetensors")),
    }


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_logits_match_single_process(results: dict, schedule: str) -> None:
    ref, got = results["ref"]["logits"], results["rank1"][f"{schedule}/logits"]
    assert got.shape == ref.shape == (4, 32, 256)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bits_per_byte_match_on_every_rank(results: dict, schedule: str) -> None:
    ref = float(results["ref"]["bpb"])
    assert 7.0 < ref < 9.5  # an untrained byte model is near log2(256) = 8 bits
    for rank in ("rank0", "rank1"):
        assert abs(float(results[rank][f"{schedule}/bpb"]) - ref) < 1e-5


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_adapter_gradients_match(results: dict, schedule: str) -> None:
    ref = {k[len("grad/") :]: v for k, v in results["ref"].items() if k.startswith("grad/")}
    got: dict[str, torch.Tensor] = {}
    for rank in ("rank0", "rank1"):
        prefix = f"{schedule}/grad/"
        got.update({k[len(prefix) :]: v for k, v in results[rank].items() if k.startswith(prefix)})
    # Only the adapter deltas train (attach_adapters froze the base): 7 per layer x 4 layers.
    assert set(got) == set(ref)
    assert len(ref) == 28 and all("lora_delta" in n for n in ref)
    # Stage 0 holds layers 0-1 and stage 1 layers 2-3: 2 layers x 7 projections each.
    for rank, held in (
        ("rank0", ("layers.0.", "layers.1.")),
        ("rank1", ("layers.2.", "layers.3.")),
    ):
        names = [n for n in results[rank] if n.startswith(f"{schedule}/grad/")]
        assert len(names) == 14 and all(any(h in n for h in held) for n in names)
    for name, value in ref.items():
        assert value.abs().max() > 0, name
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
