"""A Linux network namespace whose loopback is rate-limited, for benchmarks on a slow network.

    with RateLimitedNamespace(rate="100mbit") as ns:
        subprocess.run(ns.exec_prefix() + ["python", "worker.py"], check=True)

Inside the namespace only ``lo`` exists; every process started through :meth:`exec_prefix`
(and its children) talks to ``127.0.0.1`` through a ``tc`` token-bucket filter (tbf) on ``lo``.
All ranks share that one device, so the rate limits the *aggregate* traffic of all ranks, not
each link: with ``n`` ranks sending at once each gets about ``rate / n``.

Why the tbf parameters are what they are:

* ``mtu`` (default 9000, jumbo frames): ``lo`` starts with a 64 KiB MTU, and tbf silently drops
  every packet larger than its bucket, so a bucket smaller than the MTU stalls TCP for good.
  9000 keeps per-packet CPU cost low on a small machine while staying a real Ethernet size.
* ``burst`` (default ``max(rate / 250 Hz, 4 MTU)`` bytes): the bucket must hold several packets
  and what the rate brings in one timer tick, or tbf cannot reach its rate.
* ``latency`` (default 50 ms): the longest a packet may wait in the queue (the queue holds
  ``rate * latency + burst`` bytes); longer queues add delay, shorter ones drop more.

:class:`TwoNodes` plays two nodes instead: two namespaces joined by a veth pair shaped with tbf
in each direction, each with its own unshaped loopback, so that only the traffic between the
nodes is slow; it starts ``torchrun`` on each node and reads the link's byte counters::

    with TwoNodes(rate="100mbit") as nodes:
        nodes.run_torchrun(2, ["train.py"], env={"PYTHONPATH": "."})   # 2 nodes x 2 ranks
        print(nodes.link_counters())

The namespace is deleted on exit, on exceptions, on Ctrl-C and on SIGTERM/SIGHUP (turned into
``SystemExit`` while the namespace exists, so ``finally`` blocks run).  Creating one needs root
and iproute2 (``ip``, ``tc``); :func:`check_can_create` says clearly what is missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = [
    "NamespaceUnavailable",
    "RateLimitedNamespace",
    "TwoNodes",
    "check_can_create",
    "default_burst_bytes",
    "interface_counters",
    "loopback_counters",
    "parse_interface_counters",
    "parse_rate",
]

logger = logging.getLogger(__name__)

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_TIMER_HZ = 250


class NamespaceUnavailable(RuntimeError):
    """This process cannot create a rate-limited namespace (not root, or iproute2 missing)."""


def parse_rate(rate: str) -> int:
    """``"100mbit"`` -> 100_000_000 bits per second.  Accepts ``bit``, ``kbit``, ``mbit``, ``gbit``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?bit)\s*", str(rate).lower())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"rate must be a positive number followed by one of {list(_RATE_UNITS)} (tc syntax, e.g. "
            f"'100mbit' or '1gbit'), got {rate!r}"
        )
    return int(float(match.group(1)) * _RATE_UNITS[match.group(2)])


def default_burst_bytes(rate_bits: int, mtu: int) -> int:
    """Bucket size: what ``rate`` brings in one timer tick, and never less than four packets."""
    return max(rate_bits // _TIMER_HZ // 8, 4 * mtu)


@contextlib.contextmanager
def _closed_on_failure(owner, what: str):
    """Close ``owner`` (deleting what it created) when setting it up fails; a failed command
    becomes a :class:`NamespaceUnavailable` that names it."""
    try:
        yield
    except subprocess.CalledProcessError as exc:
        owner.close()
        raise NamespaceUnavailable(
            f"setting up {what} failed: {' '.join(exc.cmd)}: {(exc.stderr or '').strip()}"
        ) from exc
    except BaseException:
        owner.close()
        raise


def check_can_create(euid: int | None = None, which=shutil.which) -> None:
    """Raise :class:`NamespaceUnavailable`, saying why, unless a namespace can be created here."""
    euid = os.geteuid() if euid is None else euid
    problems = []
    if euid != 0:
        problems.append(f"it needs root (effective uid is {euid}): run it with sudo")
    missing = [tool for tool in ("ip", "tc") if which(tool) is None]
    if missing:
        problems.append(f"{' and '.join(missing)} not found: install iproute2 (apt-get install iproute2)")
    if problems:
        raise NamespaceUnavailable(
            "cannot create the rate-limited network namespace: "
            + "; ".join(problems)
            + ". Pass --no-netns to run on the plain (unlimited) loopback instead."
        )


def loopback_counters(proc_net_dev: str = "/proc/net/dev") -> dict[str, int]:
    """Byte and packet counters of ``lo`` in *this process's* network namespace.

    ``/proc/net/dev`` is per namespace (unlike ``/sys/class/net``, which follows the mount), so
    a process inside the namespace reads the namespace's loopback.  On ``lo`` every packet is
    counted once as sent and once as received; ``tx_bytes`` is the traffic, headers included.
    """
    with open(proc_net_dev) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = [int(v) for v in rest.split()]
                return {
                    "rx_bytes": fields[0],
                    "rx_packets": fields[1],
                    "tx_bytes": fields[8],
                    "tx_packets": fields[9],
                }
    raise RuntimeError(f"no 'lo' device in {proc_net_dev}")


class RateLimitedNamespace:
    """A network namespace ``ecb-<pid>`` with ``lo`` up and shaped by ``tc qdisc ... tbf``.

    Args:
        rate: tc rate, e.g. ``"100mbit"`` or ``"1gbit"``.
        mtu: MTU of ``lo`` inside the namespace, bytes (>= 1280).
        burst: tbf bucket in bytes (default :func:`default_burst_bytes`); must exceed the MTU.
        latency: tbf queue latency, tc syntax (``"50ms"``).
        name: namespace name (default ``ecb-<pid>``).
    """

    def __init__(
        self,
        rate: str = "100mbit",
        mtu: int = 9000,
        burst: int | None = None,
        latency: str = "50ms",
        name: str | None = None,
        run=subprocess.run,
    ) -> None:
        self.rate_bits = parse_rate(rate)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 1280 <= mtu <= 65536:
            raise ValueError(f"mtu must be an integer in [1280, 65536], got {mtu!r}")
        self.mtu = mtu
        self.burst = default_burst_bytes(self.rate_bits, mtu) if burst is None else burst
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst <= mtu:
            raise ValueError(
                f"burst must be an integer number of bytes larger than the MTU ({mtu}): tbf drops "
                f"packets larger than its bucket, got {burst!r}"
            )
        if not re.fullmatch(r"\d+(\.\d+)?(us|ms|s)", str(latency)):
            raise ValueError(f"latency must be a tc time such as '50ms', '200us' or '1s', got {latency!r}")
        self.latency = latency
        self.rate = rate
        self.name = name or f"ecb-{os.getpid()}"
        self._run = run
        self._created = False
        self._previous_handlers: dict[int, object] = {}

    def _ip(self, *args: str) -> None:
        self._run(["ip", *args], check=True, capture_output=True, text=True)

    def _in_ns(self, *args: str) -> None:
        self._ip("netns", "exec", self.name, *args)

    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def describe(self) -> str:
        return (
            f"netns {self.name}: lo mtu {self.mtu}, tc tbf rate {self.rate} burst {self.burst}b "
            f"latency {self.latency}"
        )

    def set_rate(self, rate: str, burst: int | None = None) -> None:
        """Change the shaping in place (``tc qdisc replace``)."""
        self.rate_bits = parse_rate(rate)
        self.rate = rate
        self.burst = default_burst_bytes(self.rate_bits, self.mtu) if burst is None else burst
        if self._created:
            self._shape("replace")

    def _shape(self, verb: str) -> None:
        self._in_ns(
            "tc",
            "qdisc",
            verb,
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            self.rate,
            "burst",
            f"{self.burst}b",
            "latency",
            self.latency,
        )

    def __enter__(self) -> RateLimitedNamespace:
        check_can_create()
        self._install_signal_handlers()
        with _closed_on_failure(self, self.name):
            self._ip("netns", "add", self.name)
            self._created = True
            self._in_ns("ip", "link", "set", "lo", "mtu", str(self.mtu), "up")
            self._shape("add")
        logger.info("created %s", self.describe())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete the namespace (idempotent) and restore the signal handlers."""
        try:
            if self._created:
                result = self._run(
                    ["ip", "netns", "del", self.name], check=False, capture_output=True, text=True
                )
                if result.returncode != 0:
                    logger.warning("could not delete netns %s: %s", self.name, (result.stderr or "").strip())
                else:
                    logger.info("deleted netns %s", self.name)
                self._created = False
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        def leave(signum, _frame):
            raise SystemExit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._previous_handlers[signum] = signal.signal(signum, leave)
            except ValueError:  # not the main thread: the caller's own handling applies
                pass

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


# ------------------------------------------------------------------------------------- two nodes


def interface_counters(device: str, proc_net_dev: str = "/proc/net/dev") -> dict[str, int]:
    """Byte and packet counters of ``device`` in this process's network namespace."""
    with open(proc_net_dev) as f:
        text = f.read()
    return parse_interface_counters(text, device)


def parse_interface_counters(proc_net_dev_text: str, device: str) -> dict[str, int]:
    for line in proc_net_dev_text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == device:
            fields = [int(v) for v in rest.split()]
            return {
                "rx_bytes": fields[0],
                "rx_packets": fields[1],
                "tx_bytes": fields[8],
                "tx_packets": fields[9],
            }
    raise RuntimeError(f"no {device!r} device in /proc/net/dev")


class TwoNodes:
    """Two network namespaces, node A (node rank 0) and node B (1), joined by a shaped veth pair.

    Args:
        rate: tc rate of the link between the nodes, each direction (``"100mbit"``, ``"1gbit"``).
        delay: one-way delay added on each direction with ``netem`` (tc time, e.g. ``"1ms"``);
            ``None``: none.  Needs the ``sch_netem`` kernel module.
        mtu: MTU of the veth pair and of each namespace's ``lo`` (bytes).
        burst, latency: tbf bucket (bytes) and queue latency, as for :class:`RateLimitedNamespace`.
        name: prefix of the namespace and device names (default ``ec<pid>``; at most 11 characters).

    Each namespace has ``lo`` and one end of the veth pair, with the private address
    ``10.231.0.1`` (A) or ``10.231.0.2`` (B).  A packet to an address of the namespace itself
    never leaves it (the kernel delivers it on ``lo``), so traffic between ranks of one node is
    fast and only traffic between the nodes crosses the shaped link.  gloo must bind to the
    veth address (:meth:`environment` sets ``GLOO_SOCKET_IFNAME``), and torchrun's c10d
    rendezvous needs ``--local-addr`` and ``--rdzv-conf is_host=...`` (the namespaces share one
    hostname): :meth:`torchrun_command` writes them.

    Everything is removed on exit, on exceptions, on Ctrl-C and on SIGTERM/SIGHUP: the processes
    still running in the namespaces (listed by ``ip netns pids``, so workers that left the
    launcher's session are found too), then the namespaces (the veth pair goes with them).
    """

    SUBNET = "10.231.0"

    def __init__(
        self,
        rate: str = "1gbit",
        delay: str | None = None,
        mtu: int = 9000,
        burst: int | None = None,
        latency: str = "50ms",
        name: str | None = None,
        run=subprocess.run,
    ) -> None:
        self.rate_bits = parse_rate(rate)
        self.rate = rate
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 1280 <= mtu <= 65536:
            raise ValueError(f"mtu must be an integer in [1280, 65536], got {mtu!r}")
        self.mtu = mtu
        self._burst_arg = burst
        self.burst = default_burst_bytes(self.rate_bits, mtu) if burst is None else burst
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst <= mtu:
            raise ValueError(
                f"burst must be an integer number of bytes larger than the MTU ({mtu}), got {burst!r}"
            )
        for label, value in (("latency", latency), ("delay", delay)):
            if value is not None and not re.fullmatch(r"\d+(\.\d+)?(us|ms|s)", str(value)):
                raise ValueError(f"{label} must be a tc time such as '50ms', '200us' or '1s', got {value!r}")
        self.latency = latency
        self.delay = delay
        prefix = name or f"ec{os.getpid()}"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,11}", prefix):
            raise ValueError(f"name must be 1-11 letters, digits, '-' or '_' (device names), got {name!r}")
        self.namespaces = (f"{prefix}-a", f"{prefix}-b")
        self.devices = (f"{prefix}va", f"{prefix}vb")
        self.addresses = (f"{self.SUBNET}.1", f"{self.SUBNET}.2")
        self._run = run
        self._created: list[str] = []
        self._veth_in_root = False
        self._processes: list[subprocess.Popen] = []
        self._previous_handlers: dict[int, object] = {}

    # ------------------------------------------------------------------ set-up and tear-down

    def _cmd(self, *args: str) -> None:
        self._run(list(args), check=True, capture_output=True, text=True)

    def __enter__(self) -> TwoNodes:
        check_can_create()
        self._install_signal_handlers()
        with _closed_on_failure(self, "two nodes"):
            for ns in self.namespaces:
                self._cmd("ip", "netns", "add", ns)
                self._created.append(ns)
            self._cmd("ip", "link", "add", self.devices[0], "type", "veth", "peer", "name", self.devices[1])
            self._veth_in_root = True
            for ns, device in zip(self.namespaces, self.devices):
                # Once an end is in a namespace, deleting the namespace deletes the pair.
                self._cmd("ip", "link", "set", device, "netns", ns)
                self._veth_in_root = False
            for ns, device, address in zip(self.namespaces, self.devices, self.addresses):
                self._cmd("ip", "-n", ns, "link", "set", "lo", "mtu", str(self.mtu), "up")
                self._cmd("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", device)
                self._cmd("ip", "-n", ns, "link", "set", device, "mtu", str(self.mtu), "up")
            self._shape("add")
        logger.info("created %s", self.describe())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _shape(self, verb: str) -> None:
        for ns, device in zip(self.namespaces, self.devices):
            tbf = ["tbf", "rate", self.rate, "burst", f"{self.burst}b", "latency", self.latency]
            if self.delay is None:
                self._cmd("ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", device, "root", *tbf)
            else:
                self._cmd(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    verb,
                    "dev",
                    device,
                    "root",
                    "handle",
                    "1:",
                    "netem",
                    "delay",
                    self.delay,
                )
                self._cmd(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    verb,
                    "dev",
                    device,
                    "parent",
                    "1:1",
                    "handle",
                    "10:",
                    *tbf,
                )

    def set_rate(self, rate: str, burst: int | None = None) -> None:
        """Change the rate of the link in place (``tc qdisc replace``)."""
        self.rate_bits = parse_rate(rate)
        self.rate = rate
        self.burst = default_burst_bytes(self.rate_bits, self.mtu) if burst is None else burst
        if self._created:
            self._shape("replace")

    def describe(self) -> str:
        delay = f", netem delay {self.delay}" if self.delay else ""
        return (
            f"two nodes {self.namespaces[0]} ({self.addresses[0]}) and {self.namespaces[1]} ({self.addresses[1]}): "
            f"veth mtu {self.mtu}, tc tbf rate {self.rate} each way, burst {self.burst}b, latency "
            f"{self.latency}{delay}; loopback inside each node unshaped"
        )

    def close(self) -> None:
        """Stop every process left in the namespaces, delete them (idempotent), restore signals."""
        try:
            self.stop_processes()
            for ns in list(self._created):
                result = self._run(["ip", "netns", "del", ns], check=False, capture_output=True, text=True)
                if result.returncode != 0:
                    logger.warning("could not delete netns %s: %s", ns, (result.stderr or "").strip())
                self._created.remove(ns)
            if self._veth_in_root:  # set-up failed before an end reached a namespace
                self._run(["ip", "link", "del", self.devices[0]], check=False, capture_output=True, text=True)
                self._veth_in_root = False
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self._previous_handlers.clear()

    def stop_processes(self) -> None:
        """SIGTERM, then SIGKILL, every process running in the namespaces (and those started here)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._pids_inside() | {p.pid for p in self._processes if p.poll() is None}
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (
                self._pids_inside() or any(p.poll() is None for p in self._processes)
            ):
                time.sleep(0.1)
        self._processes.clear()

    def _pids_inside(self) -> set[int]:
        pids: set[int] = set()
        for ns in self._created:
            result = self._run(["ip", "netns", "pids", ns], check=False, capture_output=True, text=True)
            pids.update(int(p) for p in (result.stdout or "").split() if p.isdigit())
        return pids

    def _install_signal_handlers(self) -> None:
        def leave(signum, _frame):
            raise SystemExit(128 + signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._previous_handlers[signum] = signal.signal(signum, leave)
            except ValueError:  # not the main thread
                pass

    # ------------------------------------------------------------------ running ranks

    def exec_prefix(self, node_rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node_rank]]

    def environment(self, node_rank: int) -> dict[str, str]:
        """What a process on this node needs in its environment: gloo binds to the veth address."""
        return {"GLOO_SOCKET_IFNAME": self.devices[node_rank]}

    def torchrun_command(
        self,
        node_rank: int,
        nproc_per_node: int,
        script: Sequence[str],
        port: int = 29400,
        max_restarts: int = 0,
        monitor_interval: float | None = None,
    ) -> list[str]:
        """``torchrun`` for one node, c10d rendezvous on node A's address."""
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            str(nproc_per_node),
            "--node-rank",
            str(node_rank),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{self.addresses[0]}:{port}",
            "--local-addr",
            self.addresses[node_rank],
            "--rdzv-conf",
            f"is_host={'true' if node_rank == 0 else 'false'}",
            "--max-restarts",
            str(max_restarts),
        ]
        if monitor_interval is not None:
            command += ["--monitor-interval", str(monitor_interval)]
        return self.exec_prefix(node_rank) + command + list(script)

    def start(
        self,
        node_rank: int,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        log: str | None = None,
    ) -> subprocess.Popen:
        """Start ``command`` on a node (prefix it with :meth:`exec_prefix` yourself, or use
        :meth:`torchrun_command`); it is stopped by :meth:`close` if still running."""
        environment = {**os.environ, **(env or {}), **self.environment(node_rank)}
        handle = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        try:
            process = subprocess.Popen(
                list(command),
                env=environment,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log:
                handle.close()
        self._processes.append(process)
        return process

    def run_torchrun(
        self,
        nproc_per_node: int,
        script: Sequence[str],
        env: dict[str, str] | None = None,
        logs: str | None = None,
        timeout_s: float = 600.0,
        **options,
    ) -> list[int]:
        """Launch torchrun on both nodes and wait; the exit codes of node A's and node B's launcher.

        On a timeout everything still running in the namespaces is stopped and ``TimeoutError``
        raised (with the logs' tails when ``logs`` is a folder).
        """
        processes = []
        for node_rank in (0, 1):
            log = os.path.join(logs, f"node{node_rank}.log") if logs else None
            processes.append(
                self.start(
                    node_rank,
                    self.torchrun_command(node_rank, nproc_per_node, script, **options),
                    env=env,
                    log=log,
                )
            )
        deadline = time.monotonic() + timeout_s
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]
        except subprocess.TimeoutExpired:
            self.stop_processes()
            tails = ""
            if logs:
                for node_rank in (0, 1):
                    with open(os.path.join(logs, f"node{node_rank}.log")) as f:
                        tails += f"\n--- node {node_rank} ---\n" + f.read()[-3000:]
            raise TimeoutError(f"torchrun on two nodes did not finish in {timeout_s:.0f} s{tails}") from None

    def link_counters(self) -> dict[str, int]:
        """Bytes (headers included) sent each way across the link: the veth ``tx`` counters."""
        out = {}
        for label, ns, device in (
            ("a_to_b", self.namespaces[0], self.devices[0]),
            ("b_to_a", self.namespaces[1], self.devices[1]),
        ):
            text = self._run(
                ["ip", "netns", "exec", ns, "cat", "/proc/net/dev"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            counters = parse_interface_counters(text, device)
            out[f"{label}_bytes"] = counters["tx_bytes"]
            out[f"{label}_packets"] = counters["tx_packets"]
        return out
