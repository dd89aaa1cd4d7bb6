"""lossd client: call the lossd loss service as if it were a local torch loss.

from lossd.client import RemoteLoss
crit = RemoteLoss("FocalLoss", gamma=2.0, alpha=0.25, endpoint="127.0.0.1:50051")
loss = crit(logits, labels, avg_factor=4.0)
loss.backward()

The names below are imported on first use, so that torch-free parts (``lossd.client.wire.limits``,
``lossd.client.wire.framing``) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuditClient": ".audit",
    "audit_run": ".audit",
    "RemoteLossSet": ".config",
    "from_config": ".config",
    "ConnectionOptions": ".connection",
    "LossClient": ".connection",
    "LossdError": ".errors",
    "LossdAssertionError": ".errors",
    "LossdIndexError": ".errors",
    "LossdNotImplementedError": ".errors",
    "LossdRuntimeError": ".errors",
    "LossdTypeError": ".errors",
    "LossdValueError": ".errors",
    "RemoteResult": ".functional",
    "remote_loss": ".functional",
    "RemoteLoss": ".module",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
