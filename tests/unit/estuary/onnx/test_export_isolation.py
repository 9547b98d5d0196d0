"""ONNX exports run in an exporter process: concurrent exports and training both succeed.

torch.export keeps tracing state process-wide; two exports in two threads of one process
(two worker groups, or a local worker beside a trainer) broke each other, and a
training thread beside an export failed in its backward pass. These tests run exactly
that and check each export against torch, and that the trainer trained.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from estuary import onnx_export
from estuary.model.tokenizer import BYTE_TOKENIZER_NAME, BYTE_VOCAB_SIZE, TOKENIZER_CONFIG_KEY
from estuary.onnx_export import export_model_dir, export_onnx
from estuary.onnx_meta import FP32_FILENAME, INT8_FILENAME, read_metadata

#: Seconds a thread of the concurrency test may take. The test took 28 s on 2 cores at a
#: load average of 9 (~30 s of CPU in all, most of it starting two exporter processes);
#: the limit only keeps a hang from lasting the whole suite.
THREAD_LIMIT_S = 240.0


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The exporter processes inherit the caller's thread count: one each, so the two
    # exports and the trainer do not oversubscribe a 2-core runner.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Pause between the trainer's steps (each ~2 ms of CPU).
TRAIN_PAUSE_S = 0.02


def tiny_llama(seed: int) -> nn.Module:
    """A 1-layer, 16-wide byte-level Llama: the smallest model the exporter handles."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    setattr(config, TOKENIZER_CONFIG_KEY, BYTE_TOKENIZER_NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def torch_logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits: np.ndarray = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return logits


def ort_logits(graph: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    logits: np.ndarray = session.run(["logits"], {"input_ids": ids})[0]
    return logits


def test_two_exports_and_a_training_loop_in_one_process_all_succeed(tmp_path: Path) -> None:
    # Prepare: two models to export and one to train, each in its own thread, all released
    # at once so the exports overlap each other and the training steps.
    models = {"a": tiny_llama(1), "b": tiny_llama(2)}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    trained = tiny_llama(3)
    start = threading.Barrier(3)
    exports_done = threading.Event()
    errors: list[str] = []
    losses: list[float] = []

    def export(name: str) -> None:
        try:
            start.wait()
            export_onnx(models[name], tmp_path / name)
        except Exception as exc:  # recorded, then asserted on below
            errors.append(f"export {name}: {type(exc).__name__}: {exc}")

    def train() -> None:
        optimiser = torch.optim.SGD(trained.parameters(), lr=0.1)
        ids = torch.arange(32).reshape(2, 16) % BYTE_VOCAB_SIZE
        try:
            start.wait()
            # At least 20 steps, and on until both exports are over; the pause leaves the
            # CPU to the exports (it is the overlap that matters, not the step count).
            while len(losses) < 20 or not exports_done.is_set():
                loss = trained(input_ids=ids, labels=ids).loss
                loss.backward()
                optimiser.step()
                optimiser.zero_grad()
                losses.append(loss.item())
                time.sleep(TRAIN_PAUSE_S)
        except Exception as exc:
            errors.append(f"train: {type(exc).__name__}: {exc}")

    exporters = [threading.Thread(target=export, args=(name,)) for name in models]
    trainer = threading.Thread(target=train)

    # Execute
    for thread in [*exporters, trainer]:
        thread.start()
    for thread in exporters:
        thread.join(THREAD_LIMIT_S)
    exports_done.set()
    trainer.join(THREAD_LIMIT_S)

    # Assert: nothing failed; each graph is valid and computes its own model's logits on
    # a batch and length unlike the example; the trainer's loss went down; the callers'
    # models were not touched.
    assert errors == []
    assert not any(t.is_alive() for t in [*exporters, trainer])
    ids = np.random.default_rng(0).integers(0, BYTE_VOCAB_SIZE, (3, 11)).astype(np.int64)
    for name, model in models.items():
        graph = tmp_path / name / FP32_FILENAME
        onnx.checker.check_model(str(graph))
        want = torch_logits(model, ids)
        np.testing.assert_allclose(ort_logits(graph, ids), want, atol=1e-4)
        other = torch_logits(models["b" if name == "a" else "a"], ids)
        assert np.abs(want - other).max() > 1e-2  # the comparison tells the models apart
        assert read_metadata(tmp_path / name).vocab_size == BYTE_VOCAB_SIZE
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in before[name].items())
    assert len(losses) >= 20 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_int8_export_is_named_in_the_metadata_and_close_to_torch(tmp_path: Path) -> None:
    model = tiny_llama(4)

    fp32 = export_onnx(model, tmp_path, int8=True, source="test")

    metadata = read_metadata(tmp_path)
    assert fp32 == tmp_path / FP32_FILENAME
    assert (metadata.fp32, metadata.int8, metadata.source) == (FP32_FILENAME, INT8_FILENAME, "test")
    ids = np.arange(24, dtype=np.int64).reshape(2, 12)
    error = np.abs(ort_logits(tmp_path / INT8_FILENAME, ids) - torch_logits(model, ids)).max()
    # int8 weights, per-channel scales: measured 0.004 on logits spanning ±0.3.
    assert error < 0.05


def test_exporter_errors_keep_their_type_and_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    missing.mkdir()

    with pytest.raises(ValueError, match="no-model"):  # CheckpointError, raised in the child
        export_model_dir(missing, tmp_path / "served")
    with pytest.raises(ValueError, match="float32"):
        export_onnx(tiny_llama(5).half(), tmp_path / "half")
    with pytest.raises(ValueError, match="cannot be copied"):
        export_onnx(_Unpicklable(), tmp_path / "local")


class _Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hook: Any = lambda: None  # a lambda does not pickle


def test_a_dead_exporter_process_is_replaced() -> None:
    first = onnx_export._run_in_exporter(os.getpid)

    # An exporter process that dies mid-call (as under the OOM killer) fails the call
    # after one retry in a fresh process; the next call gets a live process again.
    with pytest.raises(RuntimeError, match="died twice"):
        onnx_export._run_in_exporter(_die)
    second = onnx_export._run_in_exporter(os.getpid)

    assert os.getpid() not in (first, second)
    assert second != first


def _die() -> None:
    os._exit(3)


def test_exporter_records_reach_only_the_parents_handlers(tmp_path: Path) -> None:
    # The exporter process's libraries install a root handler of their own (here: a
    # basicConfig in the target). Its records must come out once, in the parent's format.
    script = tmp_path / "chatty.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, sys
            from estuary.onnx_export import _run_in_exporter

            def chatty():
                logging.basicConfig()  # what an exporter library may do in its process
                logging.getLogger("estuary.onnx_export").info("hello from the exporter")
                return 7

            if __name__ == "__main__":
                logging.basicConfig(format="PARENT %(name)s %(message)s", stream=sys.stderr)
                logging.getLogger("estuary").setLevel(logging.INFO)
                print(_run_in_exporter(chatty))
            """
        ),
        encoding="utf-8",
    )

    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "7"
    lines = [line for line in done.stderr.splitlines() if "hello from the exporter" in line]
    assert lines == ["PARENT estuary.onnx_export hello from the exporter"], done.stderr
