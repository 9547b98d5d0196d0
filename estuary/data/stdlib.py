"""The built-in corpus: the Python standard library of the running interpreter.

Each package of the standard library (``email``, ``asyncio``, ``json``, ...) is one
client's private data: naturally non-IID (different vocabularies, styles and lengths) and
present on every machine, so the benchmark needs no download. The *top-level modules*
(``argparse.py``, ``typing.py``, ...) pretrain the cloud base; they are never a client's
data, so the base has not seen any client's text.
"""

from __future__ import annotations

import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Packages used as clients by default: sizeable, stylistically distinct, and all shipped
#: with CPython 3.10+. ``test`` (the regression suite) and ``idlelib`` are left out:
#: the former is often not installed, the latter is a GUI application, not library code.
DEFAULT_CLIENT_PACKAGES: tuple[str, ...] = (
    "email",
    "asyncio",
    "json",
    "xml",
    "unittest",
    "http",
    "logging",
    "concurrent",
    "multiprocessing",
    "importlib",
    "urllib",
    "sqlite3",
)

#: Held-out text is cut into chunks of this many bytes before the train/held-out split:
#: small enough that even ``json`` (~40 KiB) gets a few dozen chunks, large enough that
#: a chunk holds several lines of context for a 128-byte window.
SPLIT_CHUNK_BYTES = 1024


@dataclass(frozen=True)
class ClientData:
    """One client's text.

    Attributes
    ----------
    name
        Client name (the package name for the stdlib corpus).
    train
        Training bytes (possibly capped by the scarce option).
    heldout
        Held-out bytes, never trained on by anyone.
    """

    name: str
    train: bytes
    heldout: bytes


def stdlib_root() -> Path:
    """Return the directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _package_files(package_dir: Path) -> list[Path]:
    # Sorted so the corpus is the same on every run; test folders inside a package are
    # kept: they are part of that package's style.
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def _read_concat(files: list[Path]) -> bytes:
    parts: list[bytes] = []
    for path in files:
        try:
            parts.append(path.read_bytes())
        except OSError as exc:
            raise OSError(f"{path}: cannot read standard-library file: {exc}") from exc
    return b"\n".join(parts)


def _chunk_is_heldout(name: str, index: int, *, fraction: float, seed: int) -> bool:
    # A keyed hash rather than an RNG stream: the split of chunk i depends only on
    # (seed, name, i), so capping the training bytes or adding files elsewhere never
    # moves a chunk between train and held-out.
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_bytes(
    data: bytes,
    *,
    name: str,
    heldout_fraction: float = 0.1,
    max_train_bytes: int | None = None,
    seed: int = 0,
) -> ClientData:
    """Split ``data`` deterministically into training and held-out bytes.

    Parameters
    ----------
    data
        The client's whole text.
    name
        Client name; part of the split key, so two clients split differently.
    heldout_fraction
        Expected fraction of chunks held out, in (0, 1).
    max_train_bytes
        Cap on the training bytes (the *scarce* regime); ``None`` keeps all of them.
        The cap keeps a seed-determined subset of whole chunks, not a prefix, so the
        scarce data is spread over the package like the full data.
    seed
        Split seed.

    Raises
    ------
    ValueError
        If ``heldout_fraction`` is outside (0, 1), ``max_train_bytes`` is not positive,
        or ``data`` is too small to give both a training and a held-out chunk.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: must be in (0, 1), got {heldout_fraction}")
    if max_train_bytes is not None and max_train_bytes <= 0:
        raise ValueError(f"max_train_bytes: must be positive or None, got {max_train_bytes}")
    chunks = [data[i : i + SPLIT_CHUNK_BYTES] for i in range(0, len(data), SPLIT_CHUNK_BYTES)]
    held = [
        _chunk_is_heldout(name, i, fraction=heldout_fraction, seed=seed) for i in range(len(chunks))
    ]
    train_chunks = [c for c, h in zip(chunks, held, strict=True) if not h]
    heldout_chunks = [c for c, h in zip(chunks, held, strict=True) if h]
    if not train_chunks or not heldout_chunks:
        raise ValueError(
            f"data: client {name!r} has {len(data)} bytes, too few for a train/held-out split"
        )
    if max_train_bytes is not None:
        order = sorted(
            range(len(train_chunks)),
            key=lambda i: hashlib.sha256(f"{seed}:{name}:keep:{i}".encode()).digest(),
        )
        kept: list[int] = []
        total = 0
        for i in order:
            if total >= max_train_bytes:
                break
            kept.append(i)
            total += len(train_chunks[i])
        # Keep document order among the kept chunks: windows may straddle two chunks.
        train = b"".join(train_chunks[i] for i in sorted(kept))[:max_train_bytes]
    else:
        train = b"".join(train_chunks)
    return ClientData(name=name, train=train, heldout=b"".join(heldout_chunks))


def stdlib_client(
    package: str,
    *,
    heldout_fraction: float = 0.1,
    max_train_bytes: int | None = None,
    seed: int = 0,
    root: Path | None = None,
) -> ClientData:
    """Return the data of the client backed by standard-library package ``package``.

    Parameters
    ----------
    package
        A package directory of the standard library (``email``, ``asyncio``, ...).
    heldout_fraction, max_train_bytes, seed
        As in :func:`split_bytes`.
    root
        Standard-library directory; defaults to :func:`stdlib_root`.

    Raises
    ------
    ValueError
        If ``package`` is not a package directory of the standard library.
    """
    base = root if root is not None else stdlib_root()
    package_dir = base / package
    files = _package_files(package_dir) if package_dir.is_dir() else []
    if not files:
        raise ValueError(f"package: {package_dir} is not a standard-library package with .py files")
    data = _read_concat(files)
    logger.debug("stdlib client %s: %d files, %d bytes", package, len(files), len(data))
    return split_bytes(
        data,
        name=package,
        heldout_fraction=heldout_fraction,
        max_train_bytes=max_train_bytes,
        seed=seed,
    )


def stdlib_clients(
    packages: tuple[str, ...] = DEFAULT_CLIENT_PACKAGES,
    *,
    heldout_fraction: float = 0.1,
    max_train_bytes: int | None = None,
    seed: int = 0,
) -> list[ClientData]:
    """Return one :class:`ClientData` per package, in the order given."""
    if not packages:
        raise ValueError("packages: at least one package is needed")
    return [
        stdlib_client(
            p, heldout_fraction=heldout_fraction, max_train_bytes=max_train_bytes, seed=seed
        )
        for p in packages
    ]


def pretrain_corpus(*, root: Path | None = None, max_bytes: int | None = None) -> bytes:
    """Return the pretraining text: the top-level ``.py`` modules of the standard library.

    Only single-file modules directly in the standard-library directory are used; every
    package (directory) is excluded, so no client's data (clients are packages) leaks
    into the base.

    Parameters
    ----------
    root
        Standard-library directory; defaults to :func:`stdlib_root`.
    max_bytes
        Optional cap on the returned length (a prefix of the sorted concatenation).

    Raises
    ------
    ValueError
        If no module is found or ``max_bytes`` is not positive.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes: must be positive or None, got {max_bytes}")
    base = root if root is not None else stdlib_root()
    files = sorted(p for p in base.glob("*.py") if p.is_file())
    if not files:
        raise ValueError(f"root: no top-level .py modules in {base}")
    data = _read_concat(files)
    return data if max_bytes is None else data[:max_bytes]
