"""The console scripts of pyproject.toml: each names a callable that runs its command, and
sandbox-run is a Hydra app whose tab completion is installed for, and answers, its own name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The script as pip's wrapper runs it: argv[0] is its name, the callable's return is the exit status."""
    module, function = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_four_entry_points_are_declared():
    assert SCRIPTS == {
        "sandbox-run": "experiments.run:cli",
        "sandbox-report": "analysis.report:main",
        "sandbox-bench": "experiments.benchmark:cli",
        "sandbox-catalogue": "experiments.catalogue:main",
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sandbox-run", "Powered by Hydra"),
        ("sandbox-report", "--wandb ENTITY/PROJECT"),
        ("sandbox-bench", "{iteration,sft,memory,sweep}"),
        ("sandbox-catalogue", "--dry-run"),
    ],
)
def test_each_script_answers_help(name, expected):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout


def test_sandbox_run_installs_and_answers_tab_completion():
    install = run_script("sandbox-run", "-sc", "install=bash")
    assert install.returncode == 0, install.stderr[-2000:]
    assert install.stdout.rstrip().endswith("-F hydra_bash_completion sandbox-run")
    line = "sandbox-run algorithm="
    query = run_script(
        "sandbox-run", "-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))}
    )
    assert query.returncode == 0, query.stderr[-2000:]
    assert {"algorithm=ppo_gae", "algorithm=ppo_sampled", "algorithm=rrhf"} <= set(query.stdout.split())
