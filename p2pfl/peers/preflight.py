"""What a peer checks before it joins anyone: its output folder and its ports.

Theory of operation
-------------------
Everything here fails in one line (`ConfigError`, exit 2 at the command line) before the peer
listens, dials or trains, because afterwards the same problems surface as a traceback from deep
inside a library, or not at all:
- `claim_out(path)`: the output folder is created (a file in the way, a path through a file or a
  folder we may not write is named as such) and locked. The lock is `flock` on `<out>/peer.lock`,
  which also holds the owner's PID for the message: two peers given the same folder (the same
  `--config`, hence the same key and peer ID) would otherwise overwrite each other's checkpoint and
  metrics. The kernel drops the lock when its process dies, so a lock file left by a killed peer is
  stale by construction and simply taken over; the file itself stays (deleting it on exit would
  let a third process lock a new file while a second still holds the old one).
- `check_ports(listen, bulk_port)`: py-libp2p binds with SO_REUSEPORT, so a second peer on an occupied
  port binds too (and the kernel splits the connections between them), and a port held by an
  ordinary socket makes the listener fail silently. A port is refused if something accepts a TCP
  connection on it, or if it cannot be bound the way libp2p binds it. A socket that is bound with
  SO_REUSEPORT but not listening (how the multi-process simulator reserves a peer's port) passes.
  The bulk channel's port is bound by trio without SO_REUSEPORT: any holder refuses it.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import IO

from p2pfl.errors import ConfigError

LOCK_FILE = "peer.lock"

try:
    import fcntl
except ImportError:   # pragma: no cover - Windows: no flock; the folder is then not locked
    fcntl = None  # type: ignore[assignment]


def make_out_dir(path: str | Path, what: str = "out") -> Path:
    """Create the output folder `path` (and its parents); ConfigError in one line when it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file, not a folder; pick another output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:
        raise ConfigError(f"{what}: {path}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot create {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {path} is not writable by this user; pick another output folder")
    return path


class OutLock:
    """The exclusive lock of one peer on its output folder (released by `release` or process exit)."""

    def __init__(self, fh: IO[str] | None) -> None:
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()   # closing the descriptor drops the flock
            self._fh = None


def claim_out(path: str | Path) -> OutLock:
    """Create the output folder and lock it for this process; ConfigError naming the holder if
    another live process has it."""
    path = make_out_dir(path)
    lock_path = path / LOCK_FILE
    try:
        fh = open(lock_path, "a+", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"out: cannot write {lock_path}: {e.strerror}") from None
    if fcntl is None:   # pragma: no cover
        return OutLock(fh)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"out: cannot lock {lock_path}: {e.strerror}") from None
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise ConfigError(f"out: {path} is in use by another peer ({who}); give each peer its own --out "
                          "(and key)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return OutLock(fh)


def _tcp_endpoint(addr: str) -> tuple[int, str, int] | None:
    """(family, host, port) of an /ip4|ip6/HOST/tcp/PORT multiaddr, None for other forms."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or not parts[4].isdigit():
        return None
    return (socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6), parts[2], int(parts[4])


def _accepts(family: int, host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (a wildcard is tried on loopback)."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _bind_error(family: int, host: str, port: int, reuse_port: bool) -> str | None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def check_ports(listen: tuple[str, ...] | list[str], bulk_port: int) -> None:
    """ConfigError in one line if a fixed listen port or the bulk channel's port is taken."""
    endpoints = [e for e in map(_tcp_endpoint, listen) if e is not None]
    for family, host, port in endpoints:
        if port == 0:
            continue
        problem = ("another program (a peer?) is listening there" if _accepts(family, host, port)
                   else _bind_error(family, host, port, reuse_port=True))
        if problem:
            raise ConfigError(f"listen: port {port} on {host} is in use: {problem}; pick a free port "
                              "(or tcp/0 for any)")
    if bulk_port > 0 and endpoints:
        family, host, _ = endpoints[0]
        problem = _bind_error(family, host, bulk_port, reuse_port=False)
        if problem:
            raise ConfigError(f"bulk_port: port {bulk_port} on {host} is in use: {problem}; pick a free port "
                              "(0: any, -1: off)")
