"""Entry points: ``experiments.run`` (a run or a sweep), ``experiments.benchmark``."""

import os

# OpenMP's idle threads sleep instead of spinning: a spinning thread holds a core that a parallel
# job, another rank or the launcher needs (two 2-thread jobs on 2 cores ran 10-50x slower). Read
# once, when torch's OpenMP runtime loads, so it is set here, before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
