"""Simulated LANs for tests: network namespaces joined by a bridge, created and removed by us.

Each ``SimulatedLan`` makes one "switch" namespace holding a bridge, and one namespace
per host with a veth into the bridge, address ``10.213.<subnet>.<i>/24``, ``lo`` up and
no default route: multicast sent in a host namespace reaches only the other hosts of
this LAN, never a real interface. Namespace names carry our PID and a counter, so
concurrent runs do not collide. Requires root and iproute2 (see ``available()``).

    with SimulatedLan(hosts=2) as lan:
        peer = lan.run(1, [sys.executable, "peer.py", lan.host_ip(1)], stdout=PIPE)
        lan.link_down(2)  # partition host 2
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from meshmq._errors import ConfigError

__all__ = ["HOST_IFACE", "SimulatedLan", "available", "namespaces"]

HOST_IFACE = "veth0"
"""Name of each host's LAN interface inside its namespace."""

_IP_TIMEOUT = 10.0  # seconds for one `ip` command
_KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
_counter = itertools.count(1)
_live: set[SimulatedLan] = set()  # created and not yet closed (kept alive for atexit)
_live_lock = threading.Lock()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one iproute2 command with a timeout; raise OSError with its stderr when check fails."""
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if check and proc.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _unique(tag: str) -> str:
    """Return a namespace name unique to this process: mmq<pid>-<n>-<tag>."""
    return f"mmq{os.getpid()}-{next(_counter)}-{tag}"


def namespaces() -> list[str]:
    """Return the names of all network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def available() -> tuple[bool, str]:
    """Return (True, "") if namespaces can be made here, else (False, why not)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 `ip` is not installed"
    probe = _unique("probe")
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"`ip netns add` failed: {exc}"
    if made.returncode != 0:
        return False, f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        _ip("netns", "del", probe, check=False)
    except (OSError, subprocess.SubprocessError):
        pass
    return True, ""


class SimulatedLan:
    """A bridge with ``hosts`` namespaces on it; a context manager that always cleans up."""

    def __init__(self, hosts: int = 2, subnet: int = 0) -> None:
        """Name the namespaces; nothing is created before __enter__ (or create())."""
        if type(hosts) is not int or not 1 <= hosts <= 250:
            raise ConfigError(f"hosts must be an int in 1..250, got {hosts!r}")
        if type(subnet) is not int or not 0 <= subnet <= 255:
            raise ConfigError(f"subnet must be an int in 0..255, got {subnet!r}")
        self.hosts = hosts
        self.subnet = subnet
        run = _unique("")
        self.switch_ns = f"{run}sw"
        self.host_ns = tuple(f"{run}h{i}" for i in range(1, hosts + 1))
        self._made: list[str] = []  # namespaces we created, in creation order
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def create(self) -> None:
        """Create the switch, the hosts and their links; on failure remove what was made."""
        if self._made:
            raise ConfigError("this SimulatedLan already exists; close() it first")
        with _live_lock:
            _live.add(self)
        try:
            self._add_ns(self.switch_ns)
            _ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch_ns, "link", "set", "br0", "up")
            for i, ns in enumerate(self.host_ns, start=1):
                self._add_ns(ns)
                # Create both veth ends directly inside their namespaces, so the names
                # never appear (or collide) in the root namespace.
                port = f"p{i}"
                _ip(
                    *("link", "add", HOST_IFACE, "netns", ns, "type", "veth"),
                    *("peer", "name", port, "netns", self.switch_ns),
                )
                _ip("-n", self.switch_ns, "link", "set", port, "master", "br0")
                _ip("-n", self.switch_ns, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.host_ip(i)}/24", "dev", HOST_IFACE)
                _ip("-n", ns, "link", "set", HOST_IFACE, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the processes we started (by PID), then delete exactly our namespaces."""
        with self._lock:
            procs, self._procs = self._procs, []
            made, self._made = self._made, []
        for proc in procs:
            _terminate(proc)
        errors: list[str] = []
        for ns in reversed(made):
            # Anything still inside a namespace only we created was started by our
            # processes; it must go before the namespace can disappear for good.
            _kill_pids(ns)
            try:
                result = _ip("netns", "del", ns, check=False)
                if result.returncode != 0:
                    errors.append(f"{ns}: {result.stderr.strip()}")
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{ns}: {exc}")
        with _live_lock:
            _live.discard(self)
        if errors:
            raise OSError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> SimulatedLan:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------------- hosts

    def host_ip(self, i: int) -> str:
        """Return host i's address (hosts are numbered from 1)."""
        self._check(i)
        return f"10.213.{self.subnet}.{i}"

    def namespace(self, i: int) -> str:
        """Return host i's namespace name."""
        self._check(i)
        return self.host_ns[i - 1]

    def run(self, i: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside host i (``ip netns exec``); it is killed on close()."""
        ns = self.namespace(i)
        if not argv:
            raise ConfigError("argv is empty")
        # `ip netns exec` execs argv in place, so proc.pid is the command itself.
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], **popen_kwargs
        )
        with self._lock:
            self._procs.append(proc)
        return proc

    def call(
        self, i: int, argv: Sequence[str], timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside host i to completion and return its result (text output)."""
        ns = self.namespace(i)
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def link_down(self, i: int) -> None:
        """Unplug host i from the switch (its interface goes down): a partition."""
        _ip("-n", self.namespace(i), "link", "set", HOST_IFACE, "down")

    def link_up(self, i: int) -> None:
        """Plug host i back in."""
        _ip("-n", self.namespace(i), "link", "set", HOST_IFACE, "up")

    def _check(self, i: int) -> None:
        if type(i) is not int or not 1 <= i <= self.hosts:
            raise ConfigError(f"host index must be in 1..{self.hosts}, got {i!r}")

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        with self._lock:
            self._made.append(ns)


def _terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after a grace period, one process by PID; reap it."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(_KILL_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_KILL_GRACE)
        except ProcessLookupError:
            pass
    # stdout/stderr stay open: a reader thread of the caller may still be draining
    # them; the caller closes its pipes (or uses the Popen as a context manager).
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _kill_pids(ns: str) -> None:
    """SIGKILL by PID whatever still runs in namespace ns (children of our processes)."""
    try:
        out = _ip("netns", "pids", ns, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return
    for word in out.split():
        if word.isdigit():
            try:
                os.kill(int(word), signal.SIGKILL)
            except ProcessLookupError:
                pass


@atexit.register
def _cleanup_at_exit() -> None:
    """Backstop: remove LANs a crashed test left open when the interpreter exits."""
    with _live_lock:
        lans = list(_live)
    for lan in lans:
        try:
            lan.close()
        except OSError:
            pass
