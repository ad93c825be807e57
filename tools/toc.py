"""The pages of the book's _toc.yml, in book order (shared by build_book, results and browser_check)."""

from __future__ import annotations

from pathlib import Path

import yaml


def toc_files(toc_yml: Path) -> list[str]:
    """Every ``file:`` entry of a Jupyter Book ``_toc.yml``, depth first, in book order (the root page excluded)."""
    files: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(Path(toc_yml).read_text()))
    return files


def toc_root(toc_yml: Path) -> str:
    """The book's root page (``root:``)."""
    return yaml.safe_load(Path(toc_yml).read_text())["root"]
