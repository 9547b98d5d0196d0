"""The docs a clone carries: links resolve inside the repository, the architecture page matches
the import contracts that `make lint` enforces.

(Not in tests/unit/ itself: pytest would put that folder on sys.path, where tests/unit/estuary
then shadows the real package in every spawned process, such as the ONNX exporter's.)"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[4]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_relative_links_resolve_inside_the_repository() -> None:
    for doc in (REPO / "README.md", REPO / "docs" / "architecture.md"):
        for target in LINK.findall(doc.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(REPO), f"{doc.name} links outside the clone: {target}"
            assert path.exists(), f"{doc.name} links to a missing file: {target}"


def test_readme_points_at_the_architecture_page() -> None:
    assert "](docs/architecture.md)" in (REPO / "README.md").read_text(encoding="utf-8")


def test_architecture_floors_match_the_import_contracts() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    linter = config["tool"]["importlinter"]
    layers = next(c for c in linter["contracts"] if c["type"] == "layers")["layers"]
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("```")[1]
    # every package the contracts know is a folder here and is placed on the page's picture
    for package in linter["root_packages"]:
        assert (REPO / package / "__init__.py").is_file(), package
        assert f"{package}/" in layout, f"docs/architecture.md's layout omits {package}/"
    # the picture lists the floors top-down in the contracts' order
    positions = []
    for layer in layers:
        first = layer.split("|")[0].strip()
        positions.append(layout.index(f"{first}/"))
    assert positions == sorted(positions), "floors out of order against pyproject's layers"
