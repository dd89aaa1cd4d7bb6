"""Helpers the per-family loss tests share: calling a loss as the server does, reading its output."""

from __future__ import annotations

import torch

import lossd.server.losses  # noqa: F401  (registers every spec)
from lossd.server import registry
from lossd.server.registry import LossOutput


def value(out):
    return out.value if isinstance(out, LossOutput) else out


def notes(out) -> list[str]:
    return out.notes if isinstance(out, LossOutput) else []


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(name: str, *args, **params):
    """Call through the registry, with its parameter canonicalisation (as the server does)."""
    spec = registry.get(name)
    return spec.fn(*args, **spec.canonical_params(params))
