"""Binding listening sockets once, in the supervisor, safely.

A unix socket path is only ever replaced when it is a stale socket: something that
is a socket file and on which nothing answers. asyncio and gunicorn unlink whatever is
there, which silently steals the path from a live server; we refuse instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from lbstack.address import Address
from lbstack.errors import SocketError

BACKLOG = 4096
DATA_MODE = 0o660
ADMIN_MODE = 0o600


def is_live(path: str, timeout: float = 0.5) -> bool:
    """Whether a server accepts connections on the unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def clear_stale(path: str) -> None:
    """Make ``path`` free for a new unix socket, or raise if that would clobber something."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    if is_live(path):
        raise SocketError(f"a live server is already listening on {path}; is a stack running?")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def bind(address: Address, mode: int = DATA_MODE, backlog: int = BACKLOG) -> socket.socket:
    """Bind and listen on ``address``; the socket is ready to be inherited by a child."""
    if address.is_unix:
        clear_stale(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # umask makes the file's mode right from the start: no window where it is wider.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(address.path)
        except OSError as exc:
            sock.close()
            raise SocketError(f"cannot bind {address}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(address.path, mode)
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise SocketError(f"cannot listen on {address}: the port is in use") from exc
            raise SocketError(f"cannot bind {address}: {exc.strerror}") from exc
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def unlink(address: Address) -> None:
    """Remove a unix socket file we created (never anything else)."""
    if not address.is_unix:
        return
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(address.path).st_mode):
            os.unlink(address.path)


def from_fd(fd: int) -> socket.socket:
    """A listening socket inherited from the supervisor."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def bound_address(address: Address, sock: socket.socket) -> Address:
    """The address actually bound (a tcp port 0 becomes the port the kernel chose)."""
    if address.is_unix:
        return address
    return Address("tcp", host=address.host, port=sock.getsockname()[1])
