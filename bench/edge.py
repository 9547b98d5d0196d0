"""Edge benchmark: compressed-base sizes, adapter step time, ORT int8 serving.

Usage::

    python bench/edge.py --json                 # pretrains a tiny base first (~1 min)
    python bench/edge.py --base DIR --json      # a base from `estuary model init`
    python bench/edge.py --preset small --pretrain-steps 0 --json   # sizes and speed only

Prints one JSON object: frozen-weight bytes of the base in fp32 / int8 / nf4, adapter
training step time on each base, eager torch vs onnxruntime-int8 latency at batch
8 × 128 and model size, and held-out bits/byte of each variant on the union of the
stdlib clients' held-out data.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_client.train import train_adapter
from estuary.adapters import AdapterConfig, GlobalAdapter
from estuary.compress import compress_model, frozen_weight_bytes
from estuary.data import eval_windows, stdlib_clients
from estuary.model import load_model
from estuary.model.evaluate import bits_per_byte
from estuary.model.pretrain import pretrained_preset

CLIENTS = ("email", "asyncio", "json", "xml", "unittest", "http", "logging", "multiprocessing")


def heldout_windows(seq_len: int, per_client: int) -> torch.Tensor:
    parts = [
        eval_windows(c.heldout, seq_len=seq_len, max_windows=per_client)
        for c in stdlib_clients(CLIENTS)
    ]
    return torch.cat(parts)


def step_seconds(base: nn.Module, data: bytes, *, rank: int, steps: int, threads: int) -> float:
    adapter = GlobalAdapter.for_model(base, AdapterConfig(r_max=16))
    result = train_adapter(
        base, adapter, data, rank=rank, steps=steps, batch_size=8, seq_len=128, threads=threads
    )
    return result.metrics.seconds / steps


def latency_child(engine: str, model: Path, threads: int) -> float:
    """Median latency of one engine at batch 8 × 128, measured in this (fresh) process."""
    torch.set_num_threads(threads)
    ids = torch.randint(0, 256, (8, 128), generator=torch.Generator().manual_seed(0))
    if engine == "torch":
        net = load_model(model)
        with torch.no_grad():
            return median_latency(lambda: net(input_ids=ids), repeats=20)
    from edge_client.serving import OrtLM

    ort = OrtLM(model, threads=threads)
    array = ids.numpy()
    return median_latency(lambda: ort.logits(array), repeats=20)


def isolated_latency(engine: str, model: Path, threads: int) -> float:
    """Run :func:`latency_child` in a subprocess.

    torch's and onnxruntime's worker threads keep spinning for a while after a call, so
    timing both engines in one process slows whichever runs second (seen here: ORT int8
    0.9x torch in one process, 1.8x in separate ones). Each engine gets a process.
    """
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--latency-child",
            engine,
            "--model",
            str(model),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def median_latency(fn: Any, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, help="HF model dir; default: pretrain tiny")
    parser.add_argument("--preset", default="tiny", help="preset to build when --base is absent")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=16, help="per client")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--latency-child", choices=("torch", "ort"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_child:
        print(json.dumps(latency_child(args.latency_child, args.model, args.threads)))
        return
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    if args.base is not None:
        fp32 = load_model(args.base)
        source = str(args.base)
    else:
        fp32 = pretrained_preset(args.preset, steps=args.pretrain_steps, seed=0)
        source = f"{args.preset} pretrained {args.pretrain_steps} steps"
    fp32.eval()  # type: ignore[no-untyped-call]
    int8 = compress_model(copy.deepcopy(fp32), scheme="int8")
    nf4 = compress_model(copy.deepcopy(fp32), scheme="nf4")
    windows = heldout_windows(128, args.eval_windows)
    train_data = stdlib_clients(("email",))[0].train

    sizes = {n: frozen_weight_bytes(m) for n, m in (("fp32", fp32), ("int8", int8), ("nf4", nf4))}
    report: dict[str, Any] = {
        "base": source,
        "parameters": sum(p.numel() for p in fp32.parameters()),
        "threads": args.threads,
        "frozen_weight_bytes": sizes,
        "compression_ratio": {
            "int8": sizes["fp32"] / sizes["int8"],
            "nf4": sizes["fp32"] / sizes["nf4"],
        },
        "targets": {
            "int8_ratio_min": 3.9,
            "nf4_ratio_min": 7.0,
            "int8_step_ratio_max": 1.15,
            "ort_speedup_min": 2.0,
            "ort_size_ratio_max": 0.3,
        },
    }

    # Alternate the bases and keep each one's best run: the machine is shared, and the
    # minimum is the least noisy estimate of the cost itself.
    train_base = copy.deepcopy(fp32)
    best: dict[str, float] = {"fp32": math.inf, "int8": math.inf, "nf4": math.inf}
    for _ in range(args.repeats):
        for name, model in (("fp32", train_base), ("int8", int8), ("nf4", nf4)):
            seconds = step_seconds(
                model, train_data, rank=16, steps=args.train_steps, threads=args.threads
            )
            best[name] = min(best[name], seconds)
    report["train_step_seconds"] = {
        "batch": "8x128",
        "rank": 16,
        **best,
        "int8_over_fp32": best["int8"] / best["fp32"],
        "nf4_over_fp32": best["nf4"] / best["fp32"],
    }

    bpb = {
        "torch_fp32": bits_per_byte(fp32, windows),
        "torch_int8": bits_per_byte(int8, windows),
        "torch_nf4": bits_per_byte(nf4, windows),
    }
    latency: dict[str, Any] = {"batch": "8x128", "measured": "one fresh process per engine"}

    try:
        from edge_client.serving import OrtLM, export_onnx, quantize_int8
        from estuary.onnx_meta import INT8_FILENAME
    except ImportError as exc:
        report["ort"] = f"omitted: edge_client.serving unavailable ({exc})"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_onnx = export_onnx(fp32, Path(tmp) / "served", example_batch=2)
            int8_onnx = quantize_int8(fp32_onnx, fp32_onnx.with_name(INT8_FILENAME))
            torch_dir = Path(tmp) / "torch"
            fp32.save_pretrained(str(torch_dir))
            eager = isolated_latency("torch", torch_dir, args.threads)
            latency["torch_fp32_eager"] = eager
            latency["ort_int8"] = isolated_latency("ort", Path(int8_onnx), args.threads)
            latency["ort_fp32"] = isolated_latency("ort", fp32_onnx, args.threads)
            latency["speedup_ort_int8_vs_torch"] = eager / latency["ort_int8"]
            ort_int8 = OrtLM(int8_onnx, threads=args.threads)
            ort_fp32 = OrtLM(fp32_onnx, threads=args.threads)
            sizes_onnx: dict[str, float] = {
                "onnx_fp32": fp32_onnx.stat().st_size,
                "onnx_int8": Path(int8_onnx).stat().st_size,
                "torch_fp32_state": sizes["fp32"],
            }
            sizes_onnx["int8_over_fp32"] = sizes_onnx["onnx_int8"] / sizes_onnx["onnx_fp32"]
            report["serving_model_bytes"] = sizes_onnx
            bpb["ort_fp32"] = ort_fp32.bits_per_byte(windows)
            bpb["ort_int8"] = ort_int8.bits_per_byte(windows)
    report["latency_seconds"] = latency
    report["heldout_bits_per_byte"] = {"windows": int(windows.shape[0]), "seq_len": 128, **bpb}
    report["wall_seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2 if not args.json else None))


if __name__ == "__main__":
    main()
