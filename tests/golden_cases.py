"""Loads the values recorded from the upstream packages (tests/golden/README.md)."""

from __future__ import annotations

from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden"


def golden_files(family: str) -> list[Path]:
    return sorted((GOLDEN / family).glob("*.pt"))


def load_golden(path: Path) -> dict:
    # Test data shipped with the repository, never client data; weights_only keeps it inert.
    return torch.load(path, weights_only=True)


def get_path(args: tuple | list, kwargs: dict, path: str):
    """Resolve a golden `grad_paths` entry such as ``args[0].pred[1]`` or ``kwargs.weight``."""
    import re

    root, rest = (args, path[4:]) if path.startswith("args") else (kwargs, path[6:])
    obj = root
    for key, index in re.findall(r"\.(\w+)|\[(\d+)\]", rest):
        obj = obj[key] if key else obj[int(index)]
    return obj
