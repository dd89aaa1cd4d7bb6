"""The caller's autocast state, captured for the server (which evaluates under the same policy)."""

from __future__ import annotations

import torch

from ._proto import lossd_pb2 as pb
from .wire import codec


def caller_autocast(device: torch.device) -> pb.Autocast | None:
    """The enclosing ``torch.autocast`` region for ``device``'s type, or None outside one.

    Autocast is per device type: a CPU region does not change ops on CUDA tensors and the
    reverse, so the state that matters is the one of the inputs' device type.
    """
    device_type = device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return pb.Autocast(enabled=True, device_type=device_type, dtype=codec.wire_dtype(dtype))
