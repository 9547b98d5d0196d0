from __future__ import annotations

from pathlib import Path

import pytest

from estuary.data import pretrain_corpus, stdlib_client, stdlib_clients
from estuary.data.stdlib import SPLIT_CHUNK_BYTES, split_bytes


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    (tmp_path / "alpha.py").write_bytes(b"ALPHA_MODULE = 1\n" * 10)
    (tmp_path / "beta.py").write_bytes(b"BETA_MODULE = 2\n" * 10)
    pkg = tmp_path / "clientpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_bytes(b"CLIENT_SECRET = 'x'\n" * 500)
    (pkg / "sub" / "mod.py").write_bytes(b"CLIENT_SUB = 'y'\n" * 500)
    return tmp_path


def test_pretrain_corpus_uses_only_top_level_modules(fake_stdlib: Path) -> None:
    corpus = pretrain_corpus(root=fake_stdlib)

    assert b"ALPHA_MODULE" in corpus and b"BETA_MODULE" in corpus
    assert b"CLIENT" not in corpus


def test_client_reads_its_package_recursively(fake_stdlib: Path) -> None:
    client = stdlib_client("clientpkg", root=fake_stdlib, heldout_fraction=0.3)
    whole = client.train + client.heldout

    assert b"CLIENT_SECRET" in whole and b"CLIENT_SUB" in whole
    assert b"ALPHA_MODULE" not in whole


def test_real_stdlib_clients_are_disjoint_from_pretraining() -> None:
    clients = stdlib_clients(("json", "email"))
    corpus = pretrain_corpus()

    # A line that only exists inside the json package.
    assert b"class JSONDecodeError(ValueError):" in clients[0].train + clients[0].heldout
    assert b"class JSONDecodeError(ValueError):" not in corpus
    assert all(len(c.heldout) > 0 and len(c.train) > len(c.heldout) for c in clients)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    data = bytes(range(256)) * 200  # 200 chunks of distinct positions

    a = split_bytes(data, name="c", heldout_fraction=0.2, seed=1)
    b = split_bytes(data, name="c", heldout_fraction=0.2, seed=1)
    other = split_bytes(data, name="c", heldout_fraction=0.2, seed=2)

    assert a == b
    assert a.heldout != other.heldout
    assert len(a.train) + len(a.heldout) == len(data)
    assert 0.08 < len(a.heldout) / len(data) < 0.35


def test_scarce_cap_keeps_a_subset_of_training_chunks() -> None:
    data = b"".join(bytes([i % 251]) * SPLIT_CHUNK_BYTES for i in range(100))
    full = split_bytes(data, name="c", seed=0)

    scarce = split_bytes(data, name="c", seed=0, max_train_bytes=5000)

    assert len(scarce.train) == 5000
    assert scarce.heldout == full.heldout
    train_chunks = {
        full.train[i : i + SPLIT_CHUNK_BYTES] for i in range(0, len(full.train), SPLIT_CHUNK_BYTES)
    }
    for i in range(0, 4 * SPLIT_CHUNK_BYTES, SPLIT_CHUNK_BYTES):
        assert scarce.train[i : i + SPLIT_CHUNK_BYTES] in train_chunks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"heldout_fraction": 0.0}, "heldout_fraction"), ({"max_train_bytes": 0}, "max_train_bytes")],
)
def test_split_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_bytes(b"x" * 10_000, name="c", **kwargs)  # type: ignore[arg-type]


def test_unknown_package_names_the_directory(fake_stdlib: Path) -> None:
    with pytest.raises(ValueError, match=r"package: .*nosuchpkg"):
        stdlib_client("nosuchpkg", root=fake_stdlib)
