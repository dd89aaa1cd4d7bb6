"""``lossd serve --unix PATH`` and ``unix:`` endpoints (issue 14 item 2): results equal local
compute over every transport, the socket is 0600 and only its owner's, it is removed at a clean
exit, a stale one (left by SIGKILL) is replaced, a live one is refused, and bad settings exit 2
with one line."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lossd.client import LossClient, RemoteLoss
from lossd.server.app import create_server
from lossd.server.config import ServerConfig, SettingError
from tests.support.serverproc import ServerProcess, serving


@pytest.mark.parametrize("transport", ["unary", "chunked", "auto"])
def test_remote_loss_over_a_unix_socket_equals_local(unix_server, transport):
    torch.manual_seed(0)
    logits = torch.randn(64, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 10, (64,))
    with RemoteLoss(
        "cross_entropy", endpoint=unix_server.address, transport=transport, timeout=60
    ) as crit:
        remote = crit(logits, target)
        (remote_grad,) = torch.autograd.grad(remote, logits)
    local = F.cross_entropy(logits, target)
    (local_grad,) = torch.autograd.grad(local, logits)
    assert unix_server.address.startswith("unix:/")
    assert torch.equal(remote.detach(), local.detach())
    assert torch.equal(remote_grad, local_grad)


def test_the_socket_is_mode_0600_and_removed_at_a_clean_stop(sock_dir):
    path = os.path.join(sock_dir, "lossd.sock")
    running = create_server(ServerConfig(port=0, unix=path, device="cpu", audit="none"))
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        assert os.listdir(sock_dir) == ["lossd.sock"]  # the staging directory is gone
        assert running.addresses == [f"127.0.0.1:{running.port}", f"unix:{path}"]
        for address in running.addresses:  # both listeners serve
            assert serving(address)
    finally:
        running.stop(0)
    assert os.listdir(sock_dir) == []


def test_a_stale_socket_file_is_replaced(sock_dir):
    path = os.path.join(sock_dir, "lossd.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # bound, never listening, then closed: what a killed server leaves
    dead.close()
    running = create_server(ServerConfig(port=-1, unix=path, device="cpu", audit="none"))
    try:
        with LossClient(f"unix:{path}", timeout=30) as client:
            assert [info.name for info in client.list_losses()]
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        running.stop(0)


def test_a_second_server_refuses_a_live_socket_and_the_first_keeps_serving(unix_server):
    path = unix_server.unix.path
    inode = os.lstat(path).st_ino
    with pytest.raises(SettingError, match="another server is listening on it"):
        create_server(ServerConfig(port=-1, unix=path, device="cpu", audit="none"))
    assert os.lstat(path).st_ino == inode and serving(unix_server.address)


def test_something_that_is_not_a_socket_is_never_replaced(sock_dir):
    path = os.path.join(sock_dir, "precious.txt")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(SettingError, match="exists and is not a socket"):
        create_server(ServerConfig(port=-1, unix=path, device="cpu", audit="none"))
    with open(path) as f:
        assert f.read() == "keep me"


def test_a_server_killed_with_sigkill_leaves_a_socket_the_next_one_replaces(sock_dir):
    path = os.path.join(sock_dir, "lossd.sock")
    flags = ("--port", "-1", "--unix", path, "--audit", "none")
    first = ServerProcess(*flags).start()
    assert first.address == f"unix:{path}"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(30)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind, nobody listening
    with ServerProcess(*flags) as second:
        with RemoteLoss("mse", endpoint=second.address, timeout=60) as crit:
            assert crit(torch.ones(2), torch.zeros(2)).item() == 1.0
        assert second.stop() == 0  # SIGTERM: a clean exit removes the socket
    assert not os.path.exists(path)


def _serve(*argv: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    return subprocess.run(
        [sys.executable, "-m", "lossd.server.cli", "serve", "--device", "cpu", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (("--port", "-1"), "lossd serve: --port -1 (no TCP port) needs --unix PATH"),
        (
            ("--port", "-2"),
            "lossd serve: --port: expected -1..65535 (-1: no TCP port, only --unix)",
        ),
        (
            ("--port", "-1", "--unix", "/" + "x" * 100),
            "lossd serve: --unix /" + "x" * 100 + ": a socket path has at most 89 bytes",
        ),
        (
            ("--port", "-1", "--unix", "/nonexistent-dir/lossd.sock"),
            "lossd serve: --unix /nonexistent-dir/lossd.sock: directory /nonexistent-dir does not exist",
        ),
    ],
    ids=["no-listener", "bad-port", "too-long", "no-directory"],
)
def test_a_unix_setting_the_server_cannot_use_exits_2_with_one_line(argv, line):
    out = _serve(*argv)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), out.stderr[-2000:]


def test_a_token_over_a_unix_socket_does_not_warn_of_cleartext(recwarn):
    LossClient("unix:/run/lossd.sock", token="t" * 20).close()
    assert not [w for w in recwarn if "without TLS" in str(w.message)]


def test_lossd_health_probes_the_socket_of_a_server_without_a_tcp_port(unix_server, capsys):
    from lossd.server import probe

    env = {"LOSSD_PORT": "-1", "LOSSD_UNIX": unix_server.unix.path}
    assert probe.main([], env=env) == 0
    assert capsys.readouterr().out.strip() == f"{unix_server.address}: SERVING"
