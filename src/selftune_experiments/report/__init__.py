"""Turn results files (JSON Lines, one finished run per line) into a Markdown report + figures.

The report answers the question the whole package is about: does a fine-tuning strategy beat the
baseline by more than the seed-to-seed noise, and at what cost? So every number is a mean ± std
over seeds, every difference from the baseline comes with a p-value from
``selftune_experiments.stats``, and
the verdict says "within noise" when the evidence is not there.

One module per job: ``records`` reads and validates results files, ``grid`` indexes the runs by
task and variant, ``sections`` writes the Markdown tables (with ``formatting``), ``plots`` draws
the figures, and ``build`` puts a report together.
"""

from selftune_experiments.report.build import build_report, write_report
from selftune_experiments.report.records import SUPPORTED_SCHEMA, Problem, RunRecord, load_results

__all__ = [
    "SUPPORTED_SCHEMA",
    "Problem",
    "RunRecord",
    "build_report",
    "load_results",
    "write_report",
]
