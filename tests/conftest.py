"""Shared fixtures: an in-process lossd server on a free port, the device under test, and for the
Unix socket and shared-memory tests (test_unix_socket.py, test_shm.py, test_shm_access.py) a
short temporary directory and a server on a Unix socket in it.

``device`` is the one device mechanism: every test whose subject depends on the device takes
it, and ``pytest --device cuda`` runs them all on a GPU (kornia's pattern); the default is CPU,
which is what CI has.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from lossd.client import LossClient
from lossd.server.app import create_server
from lossd.server.config import ServerConfig
from tests.support import reaper
from tests.support.shmkit import _server


def pytest_configure(config: pytest.Config) -> None:
    reaper.become_subreaper()


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session: pytest.Session) -> None:
    leftovers = reaper.kill_leftovers(os.getpid())
    if leftovers:
        listing = "\n".join(f"  {pid}: {cmd[:200]}" for pid, cmd in sorted(leftovers.items()))
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"killed {len(leftovers)} process(es) the suite left running:\n{listing}"
        if reporter is not None:
            reporter.write_line(message, yellow=True, bold=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", help="device for the server and tensors: cpu or cuda"
    )


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """Servers started with the default --data-dir (their SQLite audit trail) write under a
    session temp dir, never the user's ~/.local/share; ServerProcess children inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
        yield


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but torch sees no GPU")
    return torch.device(name)


@pytest.fixture()
def one_thread():
    """torch on one intra-op thread, as the server evaluates (--torch-threads 1): in-process
    references then compute in the same order, and tiny tensors (gradcheck's hundreds of calls)
    do not wait on a contended thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def server(device: torch.device):
    """One server for the whole session; tests that need special settings start their own."""
    running = create_server(ServerConfig(port=0, device=str(device), workers=4))
    yield running
    running.stop(0)


@pytest.fixture(scope="session")
def endpoint(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture()
def client(endpoint: str):
    c = LossClient(endpoint, timeout=60)
    yield c
    c.close()


@pytest.fixture()
def sock_dir():
    # Short paths: sun_path holds 108 bytes, and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="lossd-", dir="/tmp") as d:
        yield d


@pytest.fixture()
def unix_server(sock_dir):
    running = _server(sock_dir)
    yield running
    running.stop(0)
