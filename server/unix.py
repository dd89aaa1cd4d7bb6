"""The ``--unix PATH`` listener: a Unix-domain socket only its owner can use, replaced when stale.

gRPC binds a ``unix:`` address itself, with the process umask's mode, and removes whatever socket
file is already at the path, even one a live server is listening on. So the socket is bound
under a fresh sibling directory of mode 0700 (no other user can reach it there), set to 0600,
and renamed onto PATH; before that, a socket file already at PATH is probed: one a server
answers on is refused, one nobody answers on (a server killed with SIGKILL left it) is replaced
by the rename. Anything else at PATH (a file, a directory) is refused, never deleted. At a clean
exit the socket is removed, unless another server has replaced it since.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
from dataclasses import dataclass

from .config import SettingError

SOCKET_MODE = 0o600


@dataclass(frozen=True)
class UnixListener:
    path: str  # absolute
    inode: tuple[int, int]  # (st_dev, st_ino) of the socket this server bound

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    def remove(self) -> None:
        """Remove the socket if it is still this server's (not a successor's)."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)


def check_path(path: str) -> str:
    """``path`` made absolute, or a SettingError: its directory is missing, something that is not
    a socket is there, or a live server is listening on it."""
    path = os.path.abspath(path)
    where = f"--unix {path}"
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise SettingError(f"{where}: directory {parent} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise SettingError(f"{where}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SettingError(f"{where}: exists and is not a socket; not replacing it")
    if _answers(path):
        raise SettingError(f"{where}: another server is listening on it")
    return path  # stale: the rename in bind() replaces it


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as exc:
        # ECONNREFUSED: nobody listens (stale); ENOENT: nothing there. EACCES: another user's
        # socket, live or not; treat it as held rather than replace what we cannot use.
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    else:
        return True
    finally:
        probe.close()


def bind(path: str, add_port) -> UnixListener:
    """Bind ``path`` (checked by check_path) with ``add_port(address) -> int`` (the gRPC server's
    add_insecure_port or a secure variant) and return the listener, mode 0600."""
    parent = os.path.dirname(path)
    try:
        private = tempfile.mkdtemp(prefix=".lossd-", dir=parent)  # mode 0700
    except OSError as exc:
        raise SettingError(
            f"--unix {path}: cannot create a socket in {parent}: {exc.strerror}"
        ) from None
    staged = os.path.join(private, "s")
    try:
        if add_port(f"unix:{staged}") == 0:
            raise SettingError(f"--unix {path}: gRPC could not bind it")
        os.chmod(staged, SOCKET_MODE)
        if _answers(path):  # a server that started since check_path: leave it its socket
            raise SettingError(f"--unix {path}: another server is listening on it")
        os.rename(staged, path)  # atomic: replaces a stale socket, never leaves PATH missing
        st = os.lstat(path)
        return UnixListener(path, (st.st_dev, st.st_ino))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)  # only on failure; renamed away otherwise
        with contextlib.suppress(OSError):
            os.rmdir(private)
