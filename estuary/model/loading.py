"""Load any Hugging Face causal language model from a local directory.

Only safetensors weights are accepted (``pickle``-based ``.bin`` checkpoints can run code
on load). Every failure names the file at fault, so a user can tell a missing
``config.json`` from a truncated weight file.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

    from estuary.config.models import ModelSettings

logger = logging.getLogger(__name__)

#: Upper bound on a safetensors header. The format stores an 8-byte little-endian header
#: length first; the reference implementation refuses headers above 100 MB, and so do we,
#: so a corrupt length is reported instead of attempting a huge read.
MAX_SAFETENSORS_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A model or checkpoint file is missing, corrupt or truncated; the message names it."""


def check_safetensors(path: Path) -> None:
    """Validate the structure of a safetensors file without loading its tensors.

    Checks the header length, that the header is a JSON object, and that every tensor's
    byte range lies inside the file, which is what a truncated download breaks.

    Raises
    ------
    CheckpointError
        Naming ``path`` and what is wrong with it.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header claims {header_len} bytes, file has {size})"
                )
            header_raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    try:
        header = json.loads(header_raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor {name!r}")
        if offsets[1] > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                f"{offsets[1]} of a {data_len}-byte data section"
            )


def weight_files(model_dir: Path) -> list[Path]:
    """Return the safetensors weight files of a model directory.

    Raises
    ------
    CheckpointError
        If the directory has no ``*.safetensors`` file (a ``.bin``-only directory is
        refused explicitly: pickle checkpoints are not loaded).
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(model_dir.glob("*.bin")):
        raise CheckpointError(
            f"{model_dir}: only pickle (.bin) weights found; convert to model.safetensors"
        )
    raise CheckpointError(f"{model_dir / 'model.safetensors'}: no weights (*.safetensors) found")


def load_model(model_dir: str | Path) -> PreTrainedModel:
    """Load a causal LM saved with ``save_pretrained`` from ``model_dir``, in eval mode.

    Parameters
    ----------
    model_dir
        Local directory with ``config.json`` and safetensors weights (single file or
        sharded with an index).

    Raises
    ------
    CheckpointError
        If ``config.json`` or the weights are missing, or a weight file is corrupt or
        truncated; the message names the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(model_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: no config.json; not a model directory")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: invalid model config: {exc}") from exc
    for file in weight_files(path):
        check_safetensors(file)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, local_files_only=True, use_safetensors=True
        )
    except Exception as exc:  # transformers raises many types; re-raise with the path
        raise CheckpointError(f"{path}: cannot load model weights: {exc}") from exc
    cast("nn.Module", model).eval()
    logger.info("loaded %s from %s", type(model).__name__, path)
    return cast("PreTrainedModel", model)


#: Seed of a preset base: coordinators and worker groups build it with the same call, so
#: every process holds identical weights without shipping them.
PRESET_SEED = 0


def load_base(model: ModelSettings) -> nn.Module:
    """Return the full-precision base model the settings name, in eval mode.

    ``model.path``: the Hugging Face directory there. ``model.preset``: the preset freshly
    initialised with :data:`PRESET_SEED`, untrained, which is logged as a warning.

    Raises
    ------
    CheckpointError
        If ``model.path`` is not a loadable Hugging Face directory.
    """
    if model.path is not None:
        base: nn.Module = load_model(model.path)
        return base.float()
    from estuary.model.presets import build_preset

    assert model.preset is not None  # the settings validator requires one of the two
    # Said at every start, because nothing else shows it: a preset trains, serves and
    # scores like any base, only its outputs are noise.
    logger.warning(
        "model.preset = %r: the base is a freshly initialised, UNTRAINED model (for tests). "
        "To serve a pretrained base, make one once with `estuary model init --preset %s "
        "--out DIR` and set model.path = DIR instead of model.preset",
        model.preset,
        model.preset,
    )
    return build_preset(model.preset, seed=PRESET_SEED)
