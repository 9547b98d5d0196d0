"""Package hygiene: allowed imports only, no pickle; the benchmark prints one exact JSON object."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from secure_agg import bench

ROOT = Path(__file__).resolve().parents[3]


def test_imports_only_numpy_cryptography_and_the_standard_library() -> None:
    code = (
        "import sys\n"
        "import secure_agg, secure_agg.bench\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'redis', 'torch'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.strip() == ""


def test_no_module_uses_pickle_or_eval() -> None:
    for path in (ROOT / "secure_agg").glob("*.py"):
        source = path.read_text()
        for pattern in (
            r"\bimport pickle",
            r"\bfrom pickle",
            r"\bpickle\.",
            r"\beval\(",
            r"\bexec\(",
        ):
            assert not re.search(pattern, source), f"{pattern} in {path.name}"


def test_benchmark_prints_one_exact_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench.main(["--clients", "6", "--size", "1000", "--dropout", "0.34", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["exact"] is True
    assert report["survivors"] == 4
    assert set(report["client_seconds"]) == {"mean", "max", "total_mean", "total_max"}
    assert report["server_seconds"]["total"] > 0
    assert 0 < report["expansion"] < 2
