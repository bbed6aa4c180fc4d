"""The process exit codes every job and launcher agrees on (a leaf: imports nothing).

The SLURM script requeues on EXIT_PREEMPTED, `make` and shells stop on EXIT_INTERRUPTED as for any
interrupted command, and EXIT_DIVERGED tells a launcher that retrying the same step is pointless.
"""

EXIT_CONFIG = 2  # bad input: a config key, a path, a checkpoint that is not what was expected
EXIT_DIVERGED = 3  # too many consecutive non-finite losses
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "checkpointed because asked to stop; requeue/resume me"
EXIT_INTERRUPTED = 130  # Ctrl-C: the shell's code for SIGINT (128 + 2); must not trigger a requeue
