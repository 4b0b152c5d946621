"""The end of a sweep: its report, written and pointed at, with the verdicts it gives.

A Hydra callback registered in conf/config.yaml (`hydra.callbacks.sweep_report`). When every job of a
multirun has returned (once, after the last batch: the tuned sweeper's phases too), it reads
the sweep folder back with analysis.report, writes `<sweep>/report/report.md` and its figures, and
prints the report's path and the verdict table: a catalogue preset's row (`+experiment=<id>`), or,
for any other sweep, the catalogue rows its runs answer.

Off: `~hydra.callbacks.sweep_report` on the command line. A sweep with a failed job ends on that
job's error before this runs; `python -m analysis.report <sweep>` reports it then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # analysis (pandas, matplotlib, statsmodels) is imported here, in the sweep's own process, and
        # not in every job that instantiates the callback
        from analysis.records import load_local
        from analysis.report import build_report, verdict_table

        # the sweeper's config object: `now` in the folder's name resolves from its cache, as the jobs' did
        sweep_dir = Path(config.hydra.sweep.dir)
        report = build_report(load_local([sweep_dir]), sweep_dir / "report")
        preset = OmegaConf.select(config, "hydra.runtime.choices.experiment")
        if preset is not None:
            verdicts = [v for v in report.verdicts if v.id == preset]
        else:
            verdicts = [v for v in report.verdicts if v.verdict != "not run"]
        print(f"\nsweep report: {report.path.resolve()}")
        if verdicts:
            print(verdict_table(verdicts))
        else:
            print("verdicts: no catalogue row is answered by this sweep's runs")
