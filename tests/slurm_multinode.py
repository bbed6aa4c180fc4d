"""A real two-node SLURM cluster on one machine: each slurmd in its own network namespace.

Topology (all on this machine, nothing routed out): a bridge in this namespace holds the
cluster's private /24 (10.77.S.0/24, S picked free) with slurmctld on 10.77.S.1; node k's slurmd
runs in network namespace `tw<tag>-nodek` behind a veth pair on 10.77.S.(10+k), with its own
hostname (UTS namespace: `hostname` in a job says `nodek`) and, in its own mount namespace, its
own /etc/hosts naming every node (the cluster dir's `hosts` bind-mounted; nothing in /etc changes)
and its own empty /tmp and /dev/shm (tmpfs), which are node-local on every real cluster. The rest
of the filesystem is shared, like a cluster's shared home: the cluster dir lives in /var/tmp, and
tests put data and run dirs under `cluster.shared`, not in pytest's /tmp. Everything else is the
one-node cluster of tests/slurm_cluster.py (same munged, slurm.conf writer and daemon handling).
(Not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup, and slurmd then refuses to start.)

Jobs see two hosts: torchrun's c10d rendezvous listens on node1's address and gloo connects the
ranks across the two namespaces over the bridge. Processes of one node can be told apart with
`ip netns pids NS` (see `TwoNodeCluster.node_pids`), which is how a test kills one node's ranks.

`python tests/slurm_multinode.py` starts one by hand for debugging.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from slurm_cluster import ClusterUnavailable, SlurmCluster, SlurmNode, run_until_interrupted, serve_cluster

NETNS_DIR = Path("/run/netns")  # where `ip netns add NAME` puts the namespace's handle
SHARED_PARENT = "/var/tmp"  # the cluster dir (and the tests' shared files): not under the nodes' private /tmp
REPO = Path(__file__).resolve().parents[1]  # jobs run from here (and its .venv): every node must see it
# in a node's namespaces: own hostname, /etc/hosts, /tmp, /dev/shm; then exec the daemon (a Popen pid is the daemon's).
# $2/$3: a folder under /tmp that must stay visible (the checkout, when it lives in /tmp: CI clones may) and an
# empty staging mount point: it is bound there before the private /tmp hides it, then bound back to its path.
ENTER_NODE = (
    'hostname "$0" && mount --bind "$1" /etc/hosts '
    '&& { [ -z "$2" ] || { mkdir -p "$3" && mount --bind "$2" "$3"; }; } '
    "&& mount -t tmpfs -o size=2g,mode=1777 tmpfs /tmp "
    '&& { [ -z "$2" ] || { mkdir -p "$2" && mount --bind "$3" "$2"; }; } '
    '&& mount -t tmpfs -o size=2g tmpfs /dev/shm && shift 3 && exec "$@"'
)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and proc.returncode != 0:
        raise ClusterUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def _free_subnet() -> int:
    """The S of a 10.77.S.0/24 that no interface on this machine uses, picked at random so that two
    test sessions starting at once are unlikely to pick the same."""
    used = _ip("-4", "-o", "addr", "show").stdout
    nets = [ipaddress.ip_interface(w).network for w in used.split() if "/" in w and w[0].isdigit()]
    free = [s for s in range(1, 255) if not any(n.overlaps(ipaddress.ip_network(f"10.77.{s}.0/24")) for n in nets)]
    if not free:
        raise ClusterUnavailable("no free 10.77.S.0/24 subnet for the test network")
    return random.choice(free)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the multi-node SLURM tests as root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install iproute2 / util-linux (bash scripts/install_system.sh)"
    probe = f"twprobe{secrets.token_hex(3)}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=15)
    if proc.returncode != 0:
        return f"`ip netns add` failed (no network namespaces in this container?): {proc.stderr.strip()}"
    try:
        proc = subprocess.run(
            [
                "nsenter",
                f"--net={NETNS_DIR / probe}",
                "unshare",
                "--uts",
                "--mount",
                "--",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /tmp",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
        if proc.returncode != 0:
            return f"`nsenter --net ... unshare --uts --mount` + tmpfs mount failed: {proc.stderr.strip()}"
        proc = subprocess.run(
            ["ip", "link", "add", f"{probe}b", "type", "bridge"], capture_output=True, text=True, timeout=15
        )
        if proc.returncode != 0:
            return f"`ip link add ... type bridge` failed: {proc.stderr.strip()}"
        _ip("link", "del", f"{probe}b", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class NodeNetwork:
    """A bridge here and one network namespace per node (veth pair into the bridge), on a private /24."""

    names: list[str]
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = 0
    made: list[tuple[str, str]] = field(default_factory=list)  # what up() created, for down()

    @property
    def bridge(self) -> str:
        return f"tw{self.tag}br"  # interface names: at most 15 characters

    @property
    def host_addr(self) -> str:
        return f"10.77.{self.subnet}.1"

    def addr(self, i: int) -> str:
        return f"10.77.{self.subnet}.{11 + i}"

    def netns(self, i: int) -> str:
        return f"tw{self.tag}-{self.names[i]}"

    def enter(self, i: int, hosts: Path) -> list[str]:
        """Command prefix: run in node i's network namespace with its own hostname and /etc/hosts."""
        under_tmp = REPO.is_relative_to("/tmp")
        keep, stage = (str(REPO), str(hosts.parent / f"keep-{self.names[i]}")) if under_tmp else ("", "")
        return [
            "nsenter",
            f"--net={NETNS_DIR / self.netns(i)}",
            "unshare",
            "--uts",
            "--mount",
            "--",
            "sh",
            "-c",
            ENTER_NODE,
            self.names[i],
            str(hosts),
            keep,
            stage,
        ]

    def hosts(self, ctld_name: str) -> str:
        """/etc/hosts of every node: the controller's host and all nodes by name."""
        return (
            "127.0.0.1 localhost\n"
            + f"{self.host_addr} {ctld_name}\n"
            + "".join(f"{self.addr(i)} {name}\n" for i, name in enumerate(self.names))
        )

    def up(self) -> None:
        self.subnet = _free_subnet()
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.host_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(len(self.names)):
            ns, veth = self.netns(i), f"tw{self.tag}v{i}"
            _ip("netns", "add", ns)
            self.made.append(("netns", ns))
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.made.append(("link", veth))
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def pids(self, i: int) -> list[int]:
        """Processes in node i's network namespace."""
        out = _ip("netns", "pids", self.netns(i), check=False).stdout
        return [int(p) for p in out.split()]

    def down(self) -> None:
        """Kill what still runs in the namespaces, then delete what up() created (newest first)."""
        for i in range(len(self.names)):
            for pid in self.pids(i):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for kind, name in reversed(self.made):
            _ip(kind, "del", name, check=False)
        self.made.clear()


@dataclass
class TwoNodeCluster(SlurmCluster):
    """SlurmCluster whose nodes are `node1`, `node2`, each slurmd in its network and UTS namespace."""

    network: NodeNetwork = field(default_factory=lambda: NodeNetwork(["node1", "node2"]))

    @property
    def shared(self) -> Path:
        """A folder every node sees (put data and run dirs here: each node has its own /tmp)."""
        return self.root / "shared"

    def start(self, timeout: float = 30.0) -> TwoNodeCluster:
        reason = netns_unavailable()
        if reason:
            raise ClusterUnavailable(reason)
        net = self.network
        try:
            net.up()
        except Exception:
            net.down()
            raise
        self.shared.mkdir(parents=True, exist_ok=True)
        hosts = self.root / "hosts"
        hosts.write_text(net.hosts(self.host))
        self.ctld_addr = net.host_addr
        self.nodes = [SlurmNode(name, net.addr(i), net.enter(i, hosts)) for i, name in enumerate(net.names)]
        try:
            super().start(timeout)  # stops its daemons itself if they fail
        except Exception:
            self.network.down()
            raise
        return self

    def stop(self) -> None:
        super().stop()
        self.network.down()

    def node_pids(self, node: str) -> list[int]:
        return self.network.pids(self.network.names.index(node))


def start_two_node_cluster() -> TwoNodeCluster:
    root = Path(tempfile.mkdtemp(prefix="tw-slurm2-", dir=SHARED_PARENT))
    return TwoNodeCluster(root=root, cpus=min(2, os.cpu_count() or 2)).start()


if __name__ == "__main__":
    run_until_interrupted(
        start_two_node_cluster, lambda c: f"nodes {[(n.name, n.addr) for n in c.nodes]}, shared dir {c.shared}; "
    )


try:
    import pytest
except ImportError:  # used as a plain script
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def slurm_two_nodes():
        """A started two-node cluster (SLURM_CONF exported); skips with the reason (fails with TW_REQUIRE_SLURM=1)."""
        yield from serve_cluster(
            lambda root: TwoNodeCluster(root=root, cpus=min(2, os.cpu_count() or 2)),
            "two-node SLURM cluster (network namespaces)",
            parent=SHARED_PARENT,
        )
