"""What the shared-memory tests (tests/test_shm.py, tests/test_shm_access.py) share, under the
names those tests call them by: an in-process server on a Unix socket in a given directory, a
record of the chunked calls whose answer came back through shared memory, and mse with its
gradient over the data frames, to compare with. Their fixtures (``sock_dir``, ``unix_server``)
are in tests/conftest.py (test_unix_socket.py uses them too)."""

from __future__ import annotations

import os

import torch

from lossd.client import RemoteLoss
from lossd.client import shm as client_shm
from lossd.server.app import create_server
from lossd.server.config import ServerConfig


def _server(sock_dir: str, **settings):
    path = os.path.join(sock_dir, "lossd.sock")
    settings = {"audit": "none", **settings}
    return create_server(ServerConfig(port=-1, unix=path, device="cpu", **settings))


def _shm_calls(monkeypatch) -> list[str]:
    """Records, per chunked call, whether its answer came back through OUT."""
    seen: list[str] = []
    original = client_shm.Regions.answer

    def answer(self, listed):
        seen.append("out")
        return original(self, listed)

    monkeypatch.setattr(client_shm.Regions, "answer", answer)
    return seen


def _framed(endpoint: str, pred: torch.Tensor, target: torch.Tensor):
    """mse and its gradient over the data frames (``shm=False``) to ``endpoint``."""
    with RemoteLoss("mse", endpoint=endpoint, transport="chunked", shm=False, timeout=60) as crit:
        assert not crit.transport.shm
        framed = crit(pred, target)
        (framed_grad,) = torch.autograd.grad(framed, pred)
    return framed, framed_grad
