"""Local multi-process launching (torchrun) and the per-node agent used under SLURM.

`launch_local(nproc, [module, *args])` is what `titan-world train --nproc N` calls: it runs
`python -m launch.torchrun --standalone --nproc-per-node N -m module args`, i.e. torchrun's
own launcher (c10d rendezvous on a free localhost port; the trainer picks gloo on CPU).

`python -m launch.torchrun TORCHRUN_ARGS` is torchrun (`torch.distributed.run`) run in this
process, plus the one thing torchrun lacks for preemption: SIGUSR1. Plain torchrun dies on
SIGUSR1 (no handler; default action terminates) and would treat the trainer's
checkpoint-and-exit as a crash and restart the workers (`--max-restarts`). The agent here
instead forwards SIGUSR1 to its workers (they live in their own sessions, so a process-group
signal would miss them), switches elastic restarts off for the rest of this attempt, and exits
with `EXIT_PREEMPTED` so the SLURM job script knows to requeue.

Children die with their parent (Linux): the agent `launch_local` starts and every rank the agent
starts get SIGTERM from the kernel when their parent dies (`PR_SET_PDEATHSIG`), so a `kill -9` of
`titan-world train --nproc N` does not leave an agent and ranks training on and writing to the run
dir: the agent stops its ranks, which checkpoint and exit, as on any SIGTERM. (Neither a process
group nor a session helps here: nothing runs in a SIGKILLed launcher to signal one, and the ranks
live in sessions of their own.)
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

from titan_world.exit_codes import EXIT_PREEMPTED

PREEMPT_SIGNALS = (signal.SIGUSR1,)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DEATH_SIGNAL = signal.SIGTERM  # the agent stops its ranks on it; ranks checkpoint and exit on it


def _die_with_parent(parent: int, sig: int) -> None:
    """Runs in a just-forked child (Popen preexec_fn): have the kernel send `sig` when the parent dies.

    The kernel ties this to the parent *thread* that forked; callers here fork from the thread that
    then waits for the child, so that thread outlives it. If the parent died before the prctl, the
    child was already re-parented: signal ourselves, as the kernel would have.
    """
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return  # not permitted here: the child simply outlives its parent, as without this
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def die_with_parent_hook(sig: int = PARENT_DEATH_SIGNAL) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child die with this process (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(_die_with_parent, os.getpid(), int(sig))


def is_distributed_child() -> bool:
    """True inside a rank started by torchrun/srun (RANK set): do not launch again."""
    return "RANK" in os.environ


def local_torchrun_argv(nproc: int, module_args: Sequence[str], *, max_restarts: int = 0) -> list[str]:
    """The command `launch_local` runs (single node, free port chosen by torchrun)."""
    if nproc < 1:
        raise ValueError(f"--nproc={nproc}: expected >= 1")
    if not module_args:
        raise ValueError("launch_local: expected [module, *args]")
    return [
        sys.executable,
        "-m",
        "launch.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        *module_args,
    ]


def launch_local(
    nproc: int, argv_module_args: Sequence[str], env: Mapping[str, str] | None = None, *, max_restarts: int = 0
) -> int:
    """Run `module args` on `nproc` local ranks; return the launcher's exit code.

    SIGUSR1/SIGTERM sent to this process are forwarded to the agent (which forwards to the
    ranks), so `kill -USR1` on `titan-world train --nproc N` checkpoints like under SLURM. If this
    process dies (even by SIGKILL), the agent gets SIGTERM and stops the ranks.
    """
    cmd = local_torchrun_argv(nproc, argv_module_args, max_restarts=max_restarts)
    proc = subprocess.Popen(cmd, env=None if env is None else {**os.environ, **env}, preexec_fn=die_with_parent_hook())
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, _f: proc.send_signal(s))
    try:
        return _exit_code(proc.wait())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


# -- the per-node agent: torchrun in this process, preemption-aware ---------------------------
class _Preemption:
    """Set by SIGUSR1: forward it to every worker (now and any started later), stop restarts."""

    def __init__(self) -> None:
        self.requested = False
        self.agents: list[object] = []
        self._signalled: set[int] = set()

    def handle(self, signum: int, _frame: object) -> None:
        first = not self.requested
        self.requested = True
        for agent in self.agents:  # the checkpoint-and-exit that follows is not a crash
            if hasattr(agent, "_remaining_restarts"):
                agent._remaining_restarts = 0  # type: ignore[attr-defined]
        if first:
            print(
                f"[launch.torchrun] pid {os.getpid()}: got {signal.Signals(signum).name}; "
                "forwarding to the ranks (they checkpoint and exit), elastic restarts off",
                file=sys.stderr,
                flush=True,
            )
            threading.Thread(target=self._forward_loop, args=(signum,), daemon=True).start()
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        for pid in _children(os.getpid()):
            if pid not in self._signalled:
                try:
                    os.kill(pid, signum)
                    self._signalled.add(pid)
                except ProcessLookupError:
                    pass

    def _forward_loop(self, signum: int) -> None:
        # ranks that were still being (re)started when the signal came get it too
        while True:
            threading.Event().wait(1.0)
            self._forward(signum)


def _children(ppid: int) -> list[int]:
    """Direct children of `ppid` (from /proc; works whatever SLURM's proctrack plugin is)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(ppid):
            out.append(int(entry))
    return out


def _track_agents(preemption: _Preemption) -> None:
    """Remember the elastic agent torchrun builds, so SIGUSR1 can set its restarts to 0."""
    import torch.distributed.launcher.api as api  # noqa: PLC0415 (torch's elastic agent: only the agent process imports it)

    base = getattr(api, "LocalElasticAgent", None)
    if base is None:  # torch moved it: forwarding still works, restarts may re-run a checkpointed job
        return

    class _TrackedAgent(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            preemption.agents.append(self)
            if preemption.requested:
                self._remaining_restarts = 0

    api.LocalElasticAgent = _TrackedAgent


def _ranks_die_with_agent() -> None:
    """Start every rank with `die_with_parent_hook`: torch's agent starts ranks in sessions of their
    own, so without it a SIGKILLed agent (OOM killer, `kill -9`) leaves them running."""
    import torch.distributed.elastic.multiprocessing.subprocess_handler.subprocess_handler as handler  # noqa: PLC0415 (torch's elastic agent: only the agent process imports it)

    popen = getattr(handler, "Popen", None)
    if popen is None or getattr(popen, "dies_with_agent", False):  # torch moved it: ranks outlive a killed agent
        return

    def popen_dying_with_agent(*args, **kwargs):
        kwargs.setdefault("preexec_fn", die_with_parent_hook())  # called from the agent's main thread
        return popen(*args, **kwargs)

    popen_dying_with_agent.dies_with_agent = True  # type: ignore[attr-defined]
    handler.Popen = popen_dying_with_agent


def agent_main(argv: Sequence[str] | None = None) -> int:
    """`python -m launch.torchrun ...`: torchrun's CLI, returning EXIT_PREEMPTED after SIGUSR1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415 (torch's elastic agent: only the agent process imports it)
    from torch.distributed.run import parse_args, run  # noqa: PLC0415 (torch's elastic agent: only the agent process imports it)

    # Elastic restarts with the agent's shared rendezvous store are broken here (torch 2.13, gloo:
    # restarted ranks read the previous attempt's addresses and fail with "Connection refused");
    # a fresh store per attempt (torchrun's pre-2.3 behaviour) restarts cleanly.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    preemption = _Preemption()
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, preemption.handle)
    _track_agents(preemption)
    _ranks_die_with_agent()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
        rc = 0
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        rc = _exit_code(int(failure.exitcode)) or 1
        print(f"[launch.torchrun] ranks failed (first exit code {rc})", file=sys.stderr, flush=True)
    except Exception as e:  # SignalException (SIGTERM from SLURM), rendezvous errors, ...
        sigval = getattr(e, "sigval", None)
        rc = 128 + int(sigval) if sigval is not None else 1
        print(f"[launch.torchrun] stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    if preemption.requested and rc != 0:
        rc = EXIT_PREEMPTED
    return rc


if __name__ == "__main__":
    sys.exit(agent_main())
