"""Versions written by Estuary's Flower strategy, in forms the rest of Estuary reads.

Each aggregated round ``n`` becomes a folder ``OUT/v000n/``:

- ``adapter.safetensors``: the global adapter (``B`` per module, the ``A`` seed, epoch and
  ``r_max`` in its metadata), what :meth:`estuary.adapters.GlobalAdapter.load` reads;
- ``peft/``: the same adapter as a standard PEFT LoRA checkpoint
  (:func:`estuary.adapters.export_peft`; ``PeftModel.from_pretrained(base, "peft")``);
- ``model/`` (the final round, every round, or never: ``write-model``): the base with
  ``B·A`` merged in, a Hugging Face directory that ``estuary edge infer --model`` serves;
- ``version.json``: round, updates, weight sum, ranks seen, the adapter's sha256.

A folder is assembled under a temporary name and renamed into place, so a reader never
sees half a version; ``OUT/LATEST`` names the newest. Versions only go up: writing one
that is not newer than the last is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from estuary.adapters import GlobalAdapter, export_peft, merge_into_base
from simulation.flower.settings import WriteModel

LATEST = "LATEST"
ADAPTER_FILE = "adapter.safetensors"
PEFT_DIR = "peft"
MODEL_DIR = "model"
INFO_FILE = "version.json"


def version_dir(out_dir: Path, version: int) -> Path:
    """Return the folder of ``version`` under ``out_dir``."""
    return out_dir / f"v{version:04d}"


@dataclass(frozen=True)
class VersionInfo:
    """One written version.

    Attributes
    ----------
    version
        The version number (the server round that made it).
    path
        Its folder.
    adapter_sha256
        sha256 of its ``adapter.safetensors``.
    updates
        Client updates aggregated into it.
    weight_sum
        Σ w of those updates.
    ranks
        Updates per trained rank.
    model_dir
        The merged Hugging Face directory, or ``None`` when none was written.
    """

    version: int
    path: Path
    adapter_sha256: str
    updates: int
    weight_sum: float
    ranks: dict[int, int]
    model_dir: Path | None


class VersionWriter:
    """Writes each version the strategy makes.

    Parameters
    ----------
    out_dir
        Folder of the versions (created).
    base
        The full-precision base, for the merged ``model/`` folder; ``None`` only with
        ``write_model="never"``.
    write_model
        ``final``: a merged model for ``final_version`` only; ``every``; or ``never``.
    final_version
        The last version the run will make (its number of rounds).
    base_name
        Recorded in the PEFT config as ``base_model_name_or_path``; optional.

    Raises
    ------
    ValueError
        If a merged model is wanted without a base, or ``final_version`` is not positive.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        base: nn.Module | None,
        write_model: WriteModel,
        final_version: int,
        base_name: str | None = None,
    ) -> None:
        if write_model != "never" and base is None:
            raise ValueError(f"base: write_model={write_model!r} needs the full-precision base")
        if final_version <= 0:
            raise ValueError(f"final_version: must be positive, got {final_version}")
        self.out_dir = out_dir
        self.base = base
        self.write_model = write_model
        self.final_version = final_version
        self.base_name = base_name
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def latest(self) -> int:
        """Return the newest version written in ``out_dir`` (0 when none)."""
        marker = self.out_dir / LATEST
        return int(marker.read_text().strip()) if marker.is_file() else 0

    def write(
        self,
        version: int,
        adapter: GlobalAdapter,
        *,
        updates: int,
        weight_sum: float,
        ranks: Mapping[int, int],
    ) -> VersionInfo:
        """Write ``adapter`` as ``version``; return what was written.

        Raises
        ------
        ValueError
            If ``version`` is not newer than the newest version in ``out_dir``.
        """
        if version <= self.latest():
            raise ValueError(
                f"version: {version} is not newer than version {self.latest()} in "
                f"{self.out_dir} (versions only go up; use a fresh out-dir per run)"
            )
        final = version_dir(self.out_dir, version)
        tmp = final.with_name(f".{final.name}.tmp{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            adapter.save(tmp)
            sha = hashlib.sha256((tmp / ADAPTER_FILE).read_bytes()).hexdigest()
            export_peft(adapter, tmp / PEFT_DIR, base_model_name_or_path=self.base_name)
            with_model = self.write_model == "every" or (
                self.write_model == "final" and version >= self.final_version
            )
            if with_model:
                assert self.base is not None  # checked in __init__
                merged = copy.deepcopy(self.base)
                merge_into_base(merged, adapter)
                merged.save_pretrained(str(tmp / MODEL_DIR), safe_serialization=True)  # type: ignore[operator]
            info = {
                "version": version,
                "adapter_sha256": sha,
                "updates": updates,
                "weight_sum": weight_sum,
                "ranks": {str(r): n for r, n in sorted(ranks.items())},
                "r_max": adapter.config.r_max,
                "adapter_seed": adapter.config.seed,
                "adapter_epoch": adapter.config.epoch,
                "model": MODEL_DIR if with_model else None,
            }
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        marker = self.out_dir / f".{LATEST}.tmp{secrets.token_hex(4)}"
        marker.write_text(f"{version}\n")
        os.replace(marker, self.out_dir / LATEST)
        return VersionInfo(
            version=version,
            path=final,
            adapter_sha256=sha,
            updates=updates,
            weight_sum=weight_sum,
            ranks=dict(ranks),
            model_dir=final / MODEL_DIR if with_model else None,
        )
