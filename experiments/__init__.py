"""Entry points: ``experiments.run`` (a run or a sweep), ``experiments.benchmark``."""

import os
import sys


def shares_the_machine(argv: list[str], environ: os._Environ | dict) -> bool:
    """A sweep (``-m``: its jobs run side by side) or one of several ranks on this machine. While
    ``python -m experiments.run`` imports this package, ``argv[0]`` is the interpreter's own ``-m``."""
    ranks = int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", 1)))
    return ranks > 1 or "-m" in argv[1:] or "--multirun" in argv[1:]


# OpenMP's wait policy is read once, when torch's OpenMP runtime loads, so it is set here, before
# anything imports torch. Processes that share the cores make idle threads sleep: a spinning thread
# holds a core another job or rank needs (two 2-thread jobs on 2 cores: 1.8 s an iteration passive,
# 5.0 s spinning). A job alone keeps OpenMP's default, a short spin before sleeping: generation's
# many small back-to-back ops pay a thread wake-up each when passive (one 2-thread job: 0.93 s
# default, 1.17 s passive). Numbers: AMD EPYC, 2 cores, the 4x256 model of experiments.benchmark.
if shares_the_machine(sys.argv, os.environ):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
