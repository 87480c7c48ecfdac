"""Where the time of a `selftune train` run goes, phase by phase, for each strategy.

Runs the real training path (`selftune.training.train`) on a real task with timers around its
phases: batch collation (dynamic padding, then packing unless --no-packing), the student's
forward, the teacher's forward (sda, sdv, ema), loss + backward (the rest of a training step),
the optimizer step, the snapshot / average updates, evaluation, checkpoint saving, and set-up
(data loading, tokenization once, model loading). What is left of the training loop (logging,
callbacks, the data loader's own work, saving the final model) is "other". Prints a Markdown
table in ms per optimizer step and in % of the run.

    python benchmarks/profile_step.py --task rte --data-dir ../shared/data \
        --strategies baseline,sda,sdv --max-train-samples 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

from selftune.config import TrainConfig
from selftune.data.packing import PackingCollator
from selftune.self_distillation import SelfDistillation
from selftune.trainer import SelftuneTrainer
from selftune.training import train

PHASES = ("set-up (load, tokenize)", "collate", "student forward", "teacher forward",
          "loss + backward", "optimizer", "snapshot / average", "evaluation", "checkpoint",
          "other")


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: type, name: str, phase: str) -> Callable[[], None]:
        """Time every call of ``owner.name``; return the function that undoes it."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


class PhaseClock(TrainerCallback):
    """Student forward (module hooks), optimizer step and the training loop's span."""

    def __init__(self, timers: Timers) -> None:
        self.timers = timers
        self.started = self.optimizer_started = self.forward_started = 0.0
        self.steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.started = time.perf_counter()
        model.register_forward_pre_hook(self._forward_begin)
        model.register_forward_hook(self._forward_end)

    def _forward_begin(self, *_):
        self.forward_started = time.perf_counter()

    def _forward_end(self, module, *_):
        if module.training:  # evaluation has its own timer
            self.timers.seconds["student forward"] += time.perf_counter() - self.forward_started

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_started = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.timers.seconds["optimizer"] += time.perf_counter() - self.optimizer_started
        self.steps += 1


def profile(strategy: str, args: argparse.Namespace) -> dict[str, float]:
    timers = Timers()
    # The packing collator pads first (DataCollatorWithPadding inside), so one of the two is timed.
    collator = DataCollatorWithPadding if args.no_packing else PackingCollator
    undo = [
        timers.wrap(collator, "__call__", "collate"),
        timers.wrap(SelftuneTrainer, "training_step", "step"),
        timers.wrap(SelfDistillation, "teacher_logits", "teacher forward"),
        # Runs inside the optimizer window (the Trainer calls this clock's
        # on_pre_optimizer_step first, then the objective's): timed apart and taken out of it.
        timers.wrap(SelfDistillation, "before_optimizer_step", "snapshot before the update"),
        timers.wrap(SelfDistillation, "on_step_end", "snapshot / average"),
        timers.wrap(SelfDistillation, "on_epoch_end", "snapshot / average"),
        timers.wrap(Trainer, "evaluate", "evaluation"),
        timers.wrap(Trainer, "predict", "evaluation"),  # the teacher's and the vote's evaluation
        timers.wrap(SelftuneTrainer, "_save_checkpoint", "checkpoint"),
    ]
    clock = PhaseClock(timers)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as out:
            train(TrainConfig(task=args.task, data_dir=args.data_dir, model=args.model,
                              strategy=strategy, seed=0, output_dir=out,
                              max_train_samples=args.max_train_samples,
                              num_train_epochs=args.epochs,
                              per_device_train_batch_size=args.batch_size,
                              group_by_length=args.group_by_length,
                              packing=not args.no_packing),
                  callbacks=[clock])
    finally:
        for restore in undo:
            restore()
    total = time.perf_counter() - started
    s = timers.seconds
    # The vote (sdv) calls the teacher inside teacher_logits; both are inside training_step.
    backward = s["step"] - s["student forward"] - s["teacher forward"]
    phases = {
        "set-up (load, tokenize)": clock.started - started,
        "collate": s["collate"],
        "student forward": s["student forward"],
        "teacher forward": s["teacher forward"],
        "loss + backward": backward,
        "optimizer": s["optimizer"] - s["snapshot before the update"],
        "snapshot / average": s["snapshot / average"] + s["snapshot before the update"],
        "evaluation": s["evaluation"],
        "checkpoint": s["checkpoint"],
    }
    phases["other"] = total - sum(phases.values())
    return {"total": total, "steps": clock.steps, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--strategies", default="baseline,sda,sdv")
    parser.add_argument("--max-train-samples", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--group-by-length", action="store_true",
                        help="Length-grouped batches (selftune train --group-by-length).")
    parser.add_argument("--no-packing", action="store_true",
                        help="Padded batches (selftune train --no-packing).")
    args = parser.parse_args()

    results = {name: profile(name, args) for name in args.strategies.split(",")}
    names = list(results)
    print(f"\n{args.task}, {args.max_train_samples} training examples, batch {args.batch_size}, "
          f"{args.epochs:g} epoch(s), {'length-grouped' if args.group_by_length else 'random'} "
          f"batches, {'padded' if args.no_packing else 'packed'}; "
          "ms per optimizer step (% of the run)\n")
    print("| phase | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for phase in PHASES:
        cells = [f"{1000 * r[phase] / r['steps']:.0f} ({100 * r[phase] / r['total']:.0f}%)"
                 for r in results.values()]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(
        f"{1000 * r['total'] / r['steps']:.0f} ({r['total']:.1f} s)" for r in results.values())
        + " |")


if __name__ == "__main__":
    main()
