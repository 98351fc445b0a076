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

The namespace is deleted on exit, on exceptions, on Ctrl-C and on SIGTERM/SIGHUP (turned into
``SystemExit`` while the namespace exists, so ``finally`` blocks run).  Creating one needs root
and iproute2 (``ip``, ``tc``); :func:`check_can_create` says clearly what is missing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess

__all__ = [
    "NamespaceUnavailable",
    "RateLimitedNamespace",
    "check_can_create",
    "default_burst_bytes",
    "loopback_counters",
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
            "cannot create the rate-limited network namespace: " + "; ".join(problems)
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
                return {"rx_bytes": fields[0], "rx_packets": fields[1], "tx_bytes": fields[8], "tx_packets": fields[9]}
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

    def __init__(self, rate: str = "100mbit", mtu: int = 9000, burst: int | None = None, latency: str = "50ms",
                 name: str | None = None, run=subprocess.run) -> None:
        self.rate_bits = parse_rate(rate)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 1280 <= mtu <= 65536:
            raise ValueError(f"mtu must be an integer in [1280, 65536], got {mtu!r}")
        self.mtu = mtu
        self.burst = default_burst_bytes(self.rate_bits, mtu) if burst is None else burst
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst <= mtu:
            raise ValueError(f"burst must be an integer number of bytes larger than the MTU ({mtu}): tbf drops "
                             f"packets larger than its bucket, got {burst!r}")
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
        return (f"netns {self.name}: lo mtu {self.mtu}, tc tbf rate {self.rate} burst {self.burst}b "
                f"latency {self.latency}")

    def set_rate(self, rate: str, burst: int | None = None) -> None:
        """Change the shaping in place (``tc qdisc replace``)."""
        self.rate_bits = parse_rate(rate)
        self.rate = rate
        self.burst = default_burst_bytes(self.rate_bits, self.mtu) if burst is None else burst
        if self._created:
            self._shape("replace")

    def _shape(self, verb: str) -> None:
        self._in_ns("tc", "qdisc", verb, "dev", "lo", "root", "tbf", "rate", self.rate,
                    "burst", f"{self.burst}b", "latency", self.latency)

    def __enter__(self) -> RateLimitedNamespace:
        check_can_create()
        self._install_signal_handlers()
        try:
            self._ip("netns", "add", self.name)
            self._created = True
            self._in_ns("ip", "link", "set", "lo", "mtu", str(self.mtu), "up")
            self._shape("add")
        except subprocess.CalledProcessError as exc:
            self.close()
            raise NamespaceUnavailable(f"setting up {self.name} failed: {' '.join(exc.cmd)}: "
                                       f"{(exc.stderr or '').strip()}") from exc
        except BaseException:
            self.close()
            raise
        logger.info("created %s", self.describe())
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete the namespace (idempotent) and restore the signal handlers."""
        try:
            if self._created:
                result = self._run(["ip", "netns", "del", self.name], check=False, capture_output=True, text=True)
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
