"""A real one-node SLURM cluster on localhost for the launcher tests (no mocks).

Starts its own `munged` (own key and socket), `slurmctld` and `slurmd` in a temporary
directory with a unique `slurm.conf` (unique cluster name and ports), so it never touches
/etc/slurm or another cluster on the same machine. Client commands find it through
`SLURM_CONF`, which the fixture exports for the session. Every daemon is started in the
foreground by this process and stopped by its pid at teardown.

Recipe: /work/shared/SLURM-LOCAL.md (slurm-wlm 22.05, Debian 12, containers without
cgroups/systemd). Run `python tests/slurm_cluster.py` to start one by hand for debugging.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MUNGED = "/usr/sbin/munged"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (tests skip with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    daemons = [p for p in (MUNGED, SLURMCTLD, SLURMD) if not os.access(p, os.X_OK)]
    return daemons + [c for c in CLIENTS if shutil.which(c) is None]


@dataclass
class SlurmCluster:
    """Own daemons in `root`; `env` is what client commands need (SLURM_CONF)."""

    root: Path
    cpus: int = 2
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise ClusterUnavailable(f"SLURM/munge not installed (missing {', '.join(missing)}); run `bash scripts/install_system.sh` as root")
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root to launch jobs; run the SLURM tests as root")
        try:
            self._write_files()
            self._spawn("munged", [MUNGED, "-F", "--force", f"--socket={self.root}/munge/munge.socket",
                                   f"--key-file={self.root}/munge/munge.key", f"--pid-file={self.root}/munge/munged.pid",
                                   f"--log-file={self.root}/munge/munged.log", f"--seed-file={self.root}/munge/munged.seed"])
            self._wait_for(lambda: (self.root / "munge/munge.socket").exists(), 10, "munged socket")
            self._spawn("slurmctld", [SLURMCTLD, "-D", "-i", "-f", str(self.conf)])
            self._wait_for(self._ctld_up, timeout, "slurmctld to answer `scontrol ping`")
            self._spawn("slurmd", [SLURMD, "-D", "-f", str(self.conf), "-N", self.host])
            self._wait_for(self._node_idle, timeout, f"node {self.host} to become idle in `sinfo`")
        except Exception as e:
            logs = self.tail_logs()
            self.stop()
            if isinstance(e, ClusterUnavailable):
                raise ClusterUnavailable(f"{e}\n{logs}") from None
            raise ClusterUnavailable(f"SLURM daemons did not start: {e}\n{logs}") from None
        return self

    def stop(self) -> None:
        """Cancel our jobs, then stop slurmd, slurmctld, munged (by pid, SIGTERM then SIGKILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=10)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def tail_logs(self, lines: int = 15) -> str:
        return self.tail_logs_of(self.root, lines)

    @staticmethod
    def tail_logs_of(root: Path, lines: int = 15) -> str:
        out = []
        for log in sorted(root.glob("log/*.log")) + sorted(root.glob("munge/*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    # -- internals -------------------------------------------------------------------------
    def _write_files(self) -> None:
        for d in ("munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge/munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        r, host = self.root, self.host
        self.conf.write_text(
            f"""# written by tests/slurm_cluster.py
ClusterName=tw{secrets.token_hex(3)}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/builtin
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
MessageTimeout=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def _wait_for(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited with code {proc.returncode} while waiting for {what}")
            if check():
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}")

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=15)

    def _ctld_up(self) -> bool:
        return "UP" in self._run("scontrol", "ping").stdout

    def _node_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
        return bool(out) and out[0] in ("idle", "mix", "alloc")


def start_cluster(cpus: int = 2) -> SlurmCluster:
    root = Path(tempfile.mkdtemp(prefix="tw-slurm-"))
    return SlurmCluster(root=root, cpus=cpus).start()


if __name__ == "__main__":  # manual debugging: start, print the env line, wait for Ctrl-C
    c = start_cluster()
    print(f"export SLURM_CONF={c.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


# -- pytest fixture ---------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # used as a plain script
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """A started cluster with SLURM_CONF exported; skips (or fails with TW_REQUIRE_SLURM=1) if impossible."""
        root = Path(tempfile.mkdtemp(prefix="tw-slurm-"))
        try:
            cluster = SlurmCluster(root=root, cpus=min(2, os.cpu_count() or 2)).start()
        except ClusterUnavailable as e:
            shutil.rmtree(root, ignore_errors=True)
            if os.environ.get("TW_REQUIRE_SLURM") == "1":
                pytest.fail(f"SLURM required (TW_REQUIRE_SLURM=1) but unavailable: {e}")
            pytest.skip(f"local SLURM cluster unavailable: {e}")
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            yield cluster
        finally:
            cluster.stop()
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
            if os.environ.get("TW_KEEP_SLURM") != "1":
                shutil.rmtree(root, ignore_errors=True)
