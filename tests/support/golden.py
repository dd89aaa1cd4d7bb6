"""Loads the values recorded from the upstream packages (tests/golden/README.md)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


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


# Tolerances against values recorded from upstream, by the precision the case was recorded in.
GOLDEN_TOL = {
    "float64": {"rtol": 1e-7, "atol": 1e-10},
    "float32": {"rtol": 1e-4, "atol": 1e-6},
    "bfloat16": {"rtol": 1e-2, "atol": 1e-3},
}


def golden_autocast(case: dict) -> tuple[str, torch.dtype] | None:
    """An AMP case's autocast region (device type, dtype), or None."""
    region = case.get("autocast")
    return None if region is None else (region["device_type"], getattr(torch, region["dtype"]))


def golden_region(case: dict) -> contextlib.AbstractContextManager:
    """The region upstream was called (and back-propagated) in: autocast for the AMP cases."""
    region = golden_autocast(case)
    return (
        contextlib.nullcontext() if region is None else torch.autocast(region[0], dtype=region[1])
    )
