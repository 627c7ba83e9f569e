"""Network namespaces for WAN test beds (bench/wan.py, the namespaced mesh test): Linux, root only.

Theory of operation
-------------------
`why_not()` says in one line why this machine cannot host a test bed (not Linux, not root, no `ip`,
namespaces refused), or None. `Namespaces` creates `n` namespaces named `<prefix><i>` with loopback
up and deletes them on exit, whatever happened inside (a namespace outlives its processes, so
nothing may leak: the caller stops its own processes first, by PID). Two ways to join them:
`bridge()` gives namespace i a veth on a private bridge with address `<subnet>.(i+1)/24` (plain
LAN, no shaping); `adopt_tun()` moves a tun device created by a link emulator (bench/wanlink.c)
into namespace i with the same address. The addresses are private and exist only inside the
namespaces; nothing is routed out of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from types import TracebackType


def why_not() -> str | None:
    """Why network namespaces cannot be used here (one line), or None if they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, e.g. sudo)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"p2pflprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    """Run `ip ARGS`; RuntimeError naming the command and its error if it fails."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Namespaces:
    """`n` namespaces `<prefix>0..<prefix>{n-1}` for the duration of a `with` block."""

    def __init__(self, prefix: str, n: int, subnet: str = "10.79.0") -> None:
        self.names = [f"{prefix}{i}" for i in range(n)]
        self.subnet = subnet
        self._bridge: str | None = None

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def __enter__(self) -> Namespaces:
        try:
            for name in self.names:
                ip("netns", "add", name)
                ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if self._bridge is not None:
            subprocess.run(["ip", "link", "del", self._bridge], capture_output=True)
            self._bridge = None

    def bridge(self, name: str) -> None:
        """Join every namespace to a fresh bridge `name` through a veth each (a plain LAN)."""
        ip("link", "add", name, "type", "bridge")
        self._bridge = name
        ip("link", "set", name, "up")
        for i, ns in enumerate(self.names):
            outside, inside = f"{name}v{i}", f"{name}p{i}"
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "master", name)
            ip("link", "set", outside, "up")
            self._configure(i, inside)

    def adopt_tun(self, i: int, tun: str) -> None:
        """Move tun device `tun` (created here by a link emulator) into namespace i and address it."""
        ip("link", "set", tun, "netns", self.names[i])
        self._configure(i, tun)

    def _configure(self, i: int, dev: str) -> None:
        ip("-n", self.names[i], "addr", "add", f"{self.address(i)}/24", "dev", dev)
        ip("-n", self.names[i], "link", "set", dev, "up")

    def sysctl(self, i: int, key: str, value: str) -> bool:
        """Set a per-namespace sysctl; False if the kernel refuses (e.g. an unknown congestion control)."""
        r = subprocess.run(["ip", "netns", "exec", self.names[i], "sysctl", "-q", "-w", f"{key}={value}"],
                           capture_output=True, text=True)
        return r.returncode == 0

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """`argv` run inside namespace i."""
        return ["ip", "netns", "exec", self.names[i], *argv]
