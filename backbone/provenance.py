"""Where a run ran: the code's commit and the machine, recorded in its summary so that a finding
(FINDINGS.md, a report) can say what produced its numbers."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> tuple[str | None, bool]:
    """The checked-out commit and whether tracked files differ from it; (None, False) outside a git
    checkout (an installed package)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return commit, dirty


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    commit, dirty = git_commit()
    return {
        "date": datetime.now(timezone.utc).date().isoformat(),
        "commit": commit,
        "dirty": dirty,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
