"""Decode limits and the errors the codec raises; torch-free, so settings can import them."""

from __future__ import annotations

from dataclasses import dataclass


class EncodeError(TypeError):
    """A Python value has no wire form (e.g. a complex tensor, a set, a non-string dict key)."""


class DecodeError(ValueError):
    """A message does not describe a valid value. ``field`` names where, by path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class LimitError(DecodeError):
    """A message is valid but larger than a configured limit. ``setting`` names the knob."""

    def __init__(self, field: str, message: str, setting: str) -> None:
        super().__init__(field, f"{message} (raise it with {setting})")
        self.setting = setting


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds checked while decoding, before any allocation sized by the request."""

    max_rank: int = 8
    max_elements: int = 1 << 31  # per tensor
    max_total_elements: int = 1 << 32  # per request
    max_depth: int = 16  # nesting of lists/tuples/dicts
    max_items: int = 100_000  # values in one request (tensors, numbers, containers)
    max_string_bytes: int = 4096


DEFAULT_LIMITS = DecodeLimits()
