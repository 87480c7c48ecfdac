"""The runs of a report indexed by task, variant and seed."""

from __future__ import annotations

from collections.abc import Sequence

from selftune_experiments.report.records import Problem, RunRecord


class RunGrid:
    """Runs indexed by task and variant, in the order they first appear in the file."""

    def __init__(self, records: Sequence[RunRecord], baseline: str | None) -> None:
        self.records = records
        self.tasks: list[str] = list(dict.fromkeys(r.task for r in records))
        variants = list(dict.fromkeys(r.variant for r in records))
        if baseline is not None and baseline in variants:
            variants.remove(baseline)
            variants.insert(0, baseline)
        self.variants = variants
        self.baseline = baseline
        self.cells: dict[tuple[str, str], dict[int, RunRecord]] = {}
        self.warnings: list[Problem] = []
        for rec in records:
            cell = self.cells.setdefault((rec.task, rec.variant), {})
            if rec.seed in cell:
                self.warnings.append(
                    Problem(
                        rec.line,
                        "warning",
                        f"{rec.task}/{rec.variant} has two runs with seed {rec.seed} "
                        f"('{cell[rec.seed].run_id}' and '{rec.run_id}'); only the later one is "
                        "used: give the grid entries distinct variant names",
                    )
                )
            cell[rec.seed] = rec
        for (task, variant), cell in self.cells.items():
            hashes = sorted({r.config_hash for r in cell.values() if r.config_hash})
            if len(hashes) > 1:
                self.warnings.append(
                    Problem(
                        None,
                        "warning",
                        f"{task}/{variant} mixes runs of {len(hashes)} different configurations "
                        f"(config_hash {', '.join(hashes)}); its seeds are not replicates of one "
                        "recipe: rename the variant or drop the stale runs",
                    )
                )

    def cell(self, task: str, variant: str) -> dict[int, RunRecord]:
        return self.cells.get((task, variant), {})

    def scores(self, task: str, variant: str) -> dict[int, float]:
        return {seed: r.score for seed, r in self.cell(task, variant).items()}

    def has_baseline(self, task: str) -> bool:
        return self.baseline is not None and bool(self.cell(task, self.baseline))
