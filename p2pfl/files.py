"""Durable files: atomic writes and the append-only JSON-lines event log.

Theory of operation: a file that matters (summary, checkpoint, key) is written to a temp file in
the same folder, fsynced, renamed over the target and the folder fsynced, so a reader or a
restart sees the old file or the whole new one, never a part. The event log is append-only; a
process killed mid-write leaves at most one torn last line, which readers drop. It is opened
without following a symbolic link and must be a regular file: a link planted in an output folder
would otherwise make us append to whatever file it names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from p2pfl.errors import ConfigError
from p2pfl.gossip.identity import Identity


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mode is set before any byte lands (keys must never be readable)
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # Windows cannot fsync a directory
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_identity(identity: Identity, path: str | Path) -> None:
    """Write a peer's key file (libp2p's protobuf format, readable by ``libp2p.load_identity``), mode
    0600 before any byte lands, atomically."""
    atomic_write(path, identity.key_file_bytes(), mode=0o600)


def load_identity(path: str | Path, *, owner_only: bool = False) -> Identity:
    """Read a libp2p Ed25519 key file. ConfigError naming the path if it is missing, unreadable or
    corrupt, and, with `owner_only` (a peer's own key), if group or others may read or write it, as
    ssh refuses such a key: someone else may have copied it."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)   # of the file we read, not of a later one
            if owner_only and os.name != "nt" and mode & 0o077:  # Windows has no such mode bits
                raise ConfigError(f"identity key file {str(path)!r} has mode {mode:04o}: group or others can "
                                  f"access it; run `chmod 600 {path}`")
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"identity key file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read identity key file {str(path)!r}: {e}") from None
    try:
        return Identity.from_key_file_bytes(raw)
    except ValueError as e:
        raise ConfigError(f"identity key file {str(path)!r} is not a libp2p Ed25519 private key: {e}") from None


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# json.dumps with options builds a new encoder per call; the simulator writes an event per peer-round
_ENCODER = json.JSONEncoder(sort_keys=True)


class MetricsLog:
    """Append-only JSON-lines event log."""

    def __init__(self, path: str | Path) -> None:
        """Open `path` for appending (created 0644 if absent); ConfigError naming it if it is a
        symbolic link, not a regular file, or cannot be opened."""
        self.path = Path(path)
        # O_NONBLOCK: opening a FIFO for writing would otherwise wait for a reader; both flags are POSIX only
        nonblock = getattr(os, "O_NONBLOCK", 0)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | nonblock
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:   # a link fails with ELOOP, a FIFO without a reader with ENXIO: say what it is
            raise ConfigError(f"metrics log {self.path}: {_not_regular(self.path) or e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(f"metrics log {self.path}: {_not_regular(self.path) or 'not a regular file'}")
        if nonblock:   # it has done its job; the log's writes block as ordinary file writes do
            os.set_blocking(fd, True)
        self._fh: TextIO = open(fd, "a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        self._fh.write(_ENCODER.encode(event) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _not_regular(path: Path) -> str | None:
    """What is wrong with appending to `path`, if it exists as something other than a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISLNK(mode):
        return "is a symbolic link; refusing to follow it (remove it or pick another output folder)"
    if not stat.S_ISREG(mode):
        return "is not a regular file (remove it or pick another output folder)"
    return None


def import_file(path: str | Path, prefix: str) -> ModuleType:
    """Import a user's Python file once per process, under `prefix` + a digest of its resolved path
    (two files of one name stay apart). FileNotFoundError if it is missing; whatever its code raises
    propagates, and a failed import leaves no half-made module behind."""
    resolved = Path(path).resolve()
    name = prefix + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None or not resolved.is_file():
        raise FileNotFoundError(f"no such file: {resolved}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
