"""Network namespaces for chaos hosts: one ``rs-<tag>-<host>`` namespace per host, joined by a veth pair
to a bridge ``rsb<tag>`` in the root namespace, plus the iptables rules that partition them.

Every rule is added inside a host's own namespace, so nothing in the root namespace's firewall changes,
and deleting the namespace removes its rules. ``probe()`` says what this machine supports (root,
``ip netns``, ``iptables``) without installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from resilient.errors import ChaosError

IFACE = "eth0"  # the interface name inside every host namespace (workers get GLOO_SOCKET_IFNAME=eth0)


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise ChaosError(f"Command {' '.join(cmd)!r} failed ({res.returncode}): {res.stderr.strip()}.")
    return res


def probe() -> dict[str, str | None]:
    """Missing capabilities as {name: reason} (None when present)."""
    out: dict[str, str | None] = {"root": None, "netns": None, "iptables": None}
    if os.geteuid() != 0:
        out["root"] = "not running as root"
    if shutil.which("ip") is None:
        out["netns"] = "the 'ip' command (iproute2) is not installed"
    elif out["root"] is None:
        name = f"rs-probe-{os.getpid()}"
        res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if res.returncode != 0:
            out["netns"] = f"'ip netns add' failed: {res.stderr.strip()}"
        else:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    else:
        out["netns"] = "network namespaces need root"
    if shutil.which("iptables") is None:
        out["iptables"] = "the 'iptables' command is not installed"
    return out


@dataclass
class NetHost:
    name: str
    ns: str
    ip: str
    veth: str


class Network:
    """The bridge and the namespaces of one run; ``close`` deletes exactly those."""

    def __init__(self, tag: str, subnet_octet: int) -> None:
        self.tag = tag
        self.bridge = f"rsb{tag}"
        self.prefix = f"10.{200 + subnet_octet % 50}.{subnet_octet % 250}"
        self.gateway = f"{self.prefix}.1"
        self.hosts: dict[str, NetHost] = {}
        self._created_bridge = False
        _ip("ip", "link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        _ip("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("ip", "link", "set", self.bridge, "up")

    def add_host(self, name: str) -> NetHost:
        idx = len(self.hosts)
        ns = f"rs-{self.tag}-{name}"
        veth, peer = f"rv{self.tag}{idx}", f"rp{self.tag}{idx}"
        ip = f"{self.prefix}.{10 + idx}"
        _ip("ip", "netns", "add", ns)
        host = NetHost(name=name, ns=ns, ip=ip, veth=veth)
        self.hosts[name] = host
        _ip("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("ip", "link", "set", peer, "netns", ns)
        _ip("ip", "link", "set", veth, "master", self.bridge)
        _ip("ip", "link", "set", veth, "up")
        _ip("ip", "link", "set", peer, "name", IFACE, ns=ns)
        _ip("ip", "addr", "add", f"{ip}/24", "dev", IFACE, ns=ns)
        _ip("ip", "link", "set", IFACE, "up", ns=ns)
        _ip("ip", "link", "set", "lo", "up", ns=ns)
        return host

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name].ns]

    def drop(self, name: str, peers: list[str], *, inbound: bool = True, outbound: bool = True) -> None:
        """DROP traffic between host ``name`` and the addresses ``peers`` (in that host's namespace)."""
        ns = self.hosts[name].ns
        for addr in peers:
            if inbound:
                _ip("iptables", "-A", "INPUT", "-s", addr, "-j", "DROP", ns=ns)
            if outbound:
                _ip("iptables", "-A", "OUTPUT", "-d", addr, "-j", "DROP", ns=ns)

    def isolate(self, name: str) -> None:
        """Silence a host completely (everything but its own loopback)."""
        ns = self.hosts[name].ns
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _ip("iptables", "-A", chain, flag, IFACE, "-j", "DROP", ns=ns)

    def heal(self, name: str) -> None:
        """Remove every rule this run added in that host's namespace."""
        ns = self.hosts[name].ns
        for chain in ("INPUT", "OUTPUT"):
            _ip("iptables", "-F", chain, ns=ns)

    def rules(self, name: str) -> list[str]:
        res = _ip("iptables", "-S", ns=self.hosts[name].ns, check=False)
        return [line for line in res.stdout.splitlines() if line.startswith("-A")]

    def close(self) -> list[str]:
        problems = []
        for host in self.hosts.values():
            res = _ip("ip", "netns", "del", host.ns, check=False)
            if res.returncode != 0:
                problems.append(f"could not delete namespace {host.ns}: {res.stderr.strip()}")
            _ip("ip", "link", "del", host.veth, check=False)
        if self._created_bridge:
            _ip("ip", "link", "del", self.bridge, check=False)
        self.hosts.clear()
        return problems


def leftover_namespaces(tag: str) -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in res.stdout.splitlines() if line.startswith(f"rs-{tag}-")]


def leftover_links(tag: str) -> list[str]:
    """This run's bridge and veth ends still present in the root namespace (``rsb<tag>``, ``rv<tag>N``)."""
    res = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    out = []
    for line in res.stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        if name == f"rsb{tag}" or (name.startswith(f"rv{tag}") and name[len(f"rv{tag}"):].isdigit()):
            out.append(name)
    return out
