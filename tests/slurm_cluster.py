"""A real one-node SLURM cluster on localhost for the launcher tests (no mocks).

Starts its own `munged` (own key and socket), `slurmctld` and `slurmd` in a temporary
directory with a unique `slurm.conf` (unique cluster name and ports), so it never touches
/etc/slurm or another cluster on the same machine. Client commands find it through
`SLURM_CONF`, which the fixture exports while its module runs. Every daemon is started in the
foreground by this process and stopped by its pid at teardown.

A cluster is a list of `SlurmNode`s: by default one node named after this host on 127.0.0.1;
tests/slurm_multinode.py gives it two nodes, each slurmd in its own network namespace.

Recipe: /work/shared/SLURM-LOCAL.md (slurm-wlm 22.05, Debian 12, containers without
cgroups/systemd). Run `python tests/slurm_cluster.py` to start one by hand for debugging.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MUNGED = "/usr/sbin/munged"
SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (tests skip with it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    daemons = [p for p in (MUNGED, SLURMCTLD, SLURMD) if not os.access(p, os.X_OK)]
    return daemons + [c for c in CLIENTS if shutil.which(c) is None]


@dataclass
class SlurmNode:
    """One slurmd: its SLURM name, the address slurmctld reaches it at, and the command prefix that
    starts it inside its own namespaces (empty: this machine's, as the one-node cluster does)."""

    name: str
    addr: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)


@dataclass
class SlurmCluster:
    """Own daemons in `root`; `env` is what client commands need (SLURM_CONF).

    slurmctld runs here and listens on `ctld_addr`; one slurmd per entry of `nodes` (default: one
    node named after this host on 127.0.0.1). Every slurmd has its own spool, pid and log file.
    """

    root: Path
    cpus: int = 2
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    ctld_addr: str = "127.0.0.1"
    nodes: list[SlurmNode] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = [SlurmNode(self.host)]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise ClusterUnavailable(
                f"SLURM/munge not installed (missing {', '.join(missing)}); run `bash scripts/install_system.sh` as "
                "root"
            )
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root to launch jobs; run the SLURM tests as root")
        try:
            self._write_files()
            self._spawn(
                "munged",
                [
                    MUNGED,
                    "-F",
                    "--force",
                    f"--socket={self.root}/munge/munge.socket",
                    f"--key-file={self.root}/munge/munge.key",
                    f"--pid-file={self.root}/munge/munged.pid",
                    f"--log-file={self.root}/munge/munged.log",
                    f"--seed-file={self.root}/munge/munged.seed",
                ],
            )
            self._wait_for(lambda: (self.root / "munge/munge.socket").exists(), 10, "munged socket")
            self._spawn("slurmctld", [SLURMCTLD, "-D", "-i", "-f", str(self.conf)])
            self._wait_for(self._ctld_up, timeout, "slurmctld to answer `scontrol ping`")
            for node in self.nodes:
                self._spawn(f"slurmd-{node.name}", [*node.prefix, SLURMD, "-D", "-f", str(self.conf), "-N", node.name])
            names = ", ".join(n.name for n in self.nodes)
            self._wait_for(self._nodes_idle, timeout, f"node(s) {names} to become idle in `sinfo`")
        except Exception as e:
            logs = self.tail_logs()
            self.stop()
            if isinstance(e, ClusterUnavailable):
                raise ClusterUnavailable(f"{e}\n{logs}") from None
            raise ClusterUnavailable(f"SLURM daemons did not start: {e}\n{logs}") from None
        return self

    def stop(self) -> None:
        """Cancel our jobs, then stop the slurmds, slurmctld, munged (by pid, SIGTERM then SIGKILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=10)
        for name in [f"slurmd-{n.name}" for n in self.nodes] + ["slurmctld", "munged"]:
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
        for d in ("munge", "state", "log", "run", *(f"spool/{n.name}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge/munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        r, host = self.root, self.host
        node_lines = "\n".join(
            f"NodeName={n.name} NodeAddr={n.addr} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN" for n in self.nodes
        )
        self.conf.write_text(
            f"""# written by tests/slurm_cluster.py
ClusterName=tw{secrets.token_hex(3)}
SlurmctldHost={host}({self.ctld_addr})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
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
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
MessageTimeout=10
{node_lines}
PartitionName=debug Nodes={",".join(n.name for n in self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

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

    def _nodes_idle(self) -> bool:
        lines = self._run("sinfo", "-h", "-N", "-o", "%N %t").stdout.splitlines()
        states = dict(line.split() for line in lines if line.strip())
        return all(states.get(n.name) in ("idle", "mix", "alloc") for n in self.nodes)


# -- following jobs (client commands; SLURM_CONF from the environment) ----------------------------
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_state(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once SLURM forgot the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def run_logs(run_dir: Path | None, chars: int = 3000) -> str:
    """The tail of every log of a run's jobs (launcher and ranks), for failure messages."""
    files = sorted((run_dir or Path("/nonexistent")).glob("slurm/logs/**/*"))
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in files if p.is_file())


def wait_for(predicate: Callable[[], object], timeout: float, what: str, run_dir: Path | None = None):
    """Poll `predicate` until it returns something truthy (returned); on timeout fail with the run's logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{run_logs(run_dir)}")


def wait_job_done(job_id: str, run_dir: Path, timeout: float = 90, expect: str = "COMPLETED") -> dict[str, str]:
    """Wait until the job ended; fail with its logs and the daemons' logs unless it ended as `expect`."""
    info = wait_for(
        lambda: (lambda j: j if j.get("JobState") in ENDED else None)(job_state(job_id)),
        timeout,
        f"job {job_id} to end",
        run_dir,
    )
    if info["JobState"] != expect:
        keys = ("JobState", "Reason", "ExitCode", "Restarts", "RunTime")
        cluster_logs = SlurmCluster.tail_logs_of(Path(os.environ["SLURM_CONF"]).parent)
        raise AssertionError(
            f"job {job_id}: {[(k, info.get(k)) for k in keys]}, expected {expect}\n{run_logs(run_dir)}\n{cluster_logs}"
        )
    return info


def attempt_events(run_dir: Path) -> list[tuple]:
    """(attempt, event) of every line the job script wrote into slurm/attempts.jsonl."""
    lines = (run_dir / "slurm/attempts.jsonl").read_text().splitlines()
    return [(r["attempt"], r["event"]) for r in map(json.loads, lines)]


def metrics_records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def preempt_and_release(run: Path, job_id: str, min_lines: int) -> int:
    """Signal the batch shell like SLURM does (--signal=B:USR1) once `min_lines` metrics are logged, wait
    for the requeue, release the job; return how many metrics lines the first attempt wrote."""
    wait_for(
        lambda: (run / "metrics.jsonl").is_file() and len(metrics_records(run)) >= min_lines,
        120,
        f"{min_lines} training steps",
        run,
    )
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    wait_for(
        lambda: (lambda j: j.get("Restarts") == "1" and j.get("JobState") == "PENDING")(job_state(job_id)),
        90,
        "the job to requeue itself",
        run,
    )
    # SLURM holds a requeued job (BeginTime), partly because slurmd rejects a job credential issued in
    # the same second as the revoked one ("Job credential revoked"); release it, but not within that second
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
    return len(metrics_records(run))


def start_cluster(cpus: int = 2) -> SlurmCluster:
    root = Path(tempfile.mkdtemp(prefix="tw-slurm-"))
    return SlurmCluster(root=root, cpus=cpus).start()


def run_until_interrupted(
    start: Callable[[], SlurmCluster], describe: Callable[[SlurmCluster], str] = lambda c: ""
) -> None:
    """Manual debugging (`python tests/slurm_*.py`): start, print the env line, wait for Ctrl-C, stop."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`/`timeout` stop it cleanly too
    c = start()
    print(f"export SLURM_CONF={c.conf}   # {describe(c)}Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


if __name__ == "__main__":
    run_until_interrupted(start_cluster)


# -- pytest fixtures ---------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # used as a plain script
    pytest = None


def unavailable(reason: str) -> None:
    """Skip with the reason; where SLURM is required (TW_REQUIRE_SLURM=1, as in CI) fail instead."""
    if os.environ.get("TW_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM required (TW_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(reason)


def serve_cluster(make: Callable[[Path], SlurmCluster], what: str, parent: str | None = None) -> Iterator[SlurmCluster]:
    """Body of a cluster fixture: start `make(temp dir)`, export SLURM_CONF while it runs, stop it, clean up.

    Module-scoped fixtures use it, so a module's cluster is stopped before the next module's starts
    (the SLURM tests share one xdist group: they run in one worker, one after the other)."""
    root = Path(tempfile.mkdtemp(prefix="tw-slurm-", dir=parent))
    try:
        cluster = make(root).start()
    except ClusterUnavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"{what} unavailable: {e}")
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


if pytest is not None:

    @pytest.fixture(scope="module")
    def slurm_cluster():
        """A started one-node cluster, SLURM_CONF exported; skips (fails with TW_REQUIRE_SLURM=1) if impossible."""
        yield from serve_cluster(
            lambda root: SlurmCluster(root=root, cpus=min(2, os.cpu_count() or 2)), "local SLURM cluster"
        )
