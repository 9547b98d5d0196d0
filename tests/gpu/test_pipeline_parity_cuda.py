"""Pipeline parity on CUDA with NCCL: the CPU/gloo parity test, on GPUs.

Needs 2 GPUs for 2 stages (NCCL cannot run two ranks on one device); skipped otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "cloud_workers"))
from pipeline_parity import free_port, reference, run_rank  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    if torch.cuda.device_count() < 2:
        pytest.skip("2-stage NCCL parity needs 2 GPUs")
    out = tmp_path_factory.mktemp("parity-cuda")
    mp.spawn(run_rank, args=(f"tcp://127.0.0.1:{free_port()}", str(out), "nccl"), nprocs=2)
    return {
        "ref": reference(torch.device("cuda", 0)),
        "rank0": load_file(str(out / "rank0.safetensors")),
        "rank1": load_file(str(out / "rank1.safetensors")),
    }


def test_single_gpu_forward_matches_cpu() -> None:
    # Runs on one GPU: the model code is device-agnostic, logits agree with the CPU
    # within TF32-free fp32 kernel differences.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = reference(torch.device("cpu"))
    gpu = reference(torch.device("cuda", 0))
    torch.testing.assert_close(gpu["logits"], cpu["logits"], atol=1e-4, rtol=0)
    assert abs(float(gpu["bpb"]) - float(cpu["bpb"])) < 1e-4


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_nccl_pipeline_matches_single_gpu(results: dict, schedule: str) -> None:
    torch.testing.assert_close(
        results["rank1"][f"{schedule}/logits"], results["ref"]["logits"], atol=1e-5, rtol=0
    )
    assert abs(float(results["rank0"][f"{schedule}/bpb"]) - float(results["ref"]["bpb"])) < 1e-5
    ref = {k[5:]: v for k, v in results["ref"].items() if k.startswith("grad/")}
    got = {}
    for rank in ("rank0", "rank1"):
        prefix = f"{schedule}/grad/"
        got.update({k[len(prefix) :]: v for k, v in results[rank].items() if k.startswith(prefix)})
    assert set(got) == set(ref) and len(ref) == 28
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
