"""Task mixing for multi-task training (BAM!, docs/methods.md §2.3).

BAM! gives each task a share of the training examples proportional to |D_τ|^0.75, between
proportional sampling (large tasks drown small ones) and uniform sampling (small tasks are
over-fitted). The reference code gets there by repeating small datasets a whole number of
times and compensating with per-task loss weights. Here the share is reached by sampling with
probabilities instead: every example slot of a batch draws its task with probability = share,
so the expected share is exactly what the paper specifies, every loss weight stays 1, and no
``loss_weights_for_repetition`` is needed.

Each task's examples come from its own stream: a shuffled pass over the task's indices,
reshuffled when exhausted (so small tasks are repeated and large ones are still covered
without repeats before a full pass). The streams continue across epochs, and everything is a
function of ``(seed, epoch)`` alone, so ``set_epoch`` gives the same batches whatever was
iterated before (as ``DistributedSampler``). Under several processes, ``ProcessChunks`` below
gives each rank its slice of every global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import Sampler

from selftune.errors import SelftuneError

SHARE_METHODS = ("power", "proportional", "uniform")

# Streams of the two random sources, so task draws and per-task shuffles never share numbers.
_TASK_DRAWS, _SHUFFLES = 0, 1


def task_shares(
    sizes: Mapping[str, int], method: str = "power", alpha: float = 0.75
) -> dict[str, float]:
    """Share of the training examples for each task: ∝ |D|^alpha, ∝ |D| or uniform.

    "power" with alpha = 0.75 is BAM!'s choice; "proportional" is what concatenating the
    datasets gives, the paper's "no task sampling" ablation; "uniform" gives every task the
    same share. The shares sum to 1 and keep the order of ``sizes``.
    """
    if method not in SHARE_METHODS:
        raise SelftuneError(f"unknown task sampling method {method!r}; choose one of "
                            f"{list(SHARE_METHODS)}")
    if not sizes:
        raise SelftuneError("task sampling needs at least one task")
    for task, size in sizes.items():
        if size <= 0:
            raise SelftuneError(f"task {task} has {size} training examples; it needs at least one")
    if method == "power" and not math.isfinite(alpha):
        raise SelftuneError(f"task sampling exponent must be a finite number, got {alpha}")
    exponent = {"power": alpha, "proportional": 1.0, "uniform": 0.0}[method]
    weights = {task: float(size) ** exponent for task, size in sizes.items()}
    total = sum(weights.values())
    return {task: w / total for task, w in weights.items()}


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Batches of indices into a concatenation of several tasks' datasets, mixed by share.

    ``task_indices`` maps each task to its indices in the concatenated dataset; ``shares``
    (e.g. from :func:`task_shares`; normalised here) gives each task's probability. With
    ``mix=True`` every example slot draws its task, so batches mix tasks; with ``mix=False``
    every batch draws one task and is filled from it (for models that send a whole batch to
    one head, and to compare with mixed batches). ``num_batches`` is the number of batches
    per epoch, by default ceil(total examples / batch_size) — one epoch sees as many examples
    as there are, not each example once.
    """

    def __init__(
        self,
        task_indices: Mapping[str, Sequence[int]],
        batch_size: int,
        shares: Mapping[str, float],
        num_batches: int | None = None,
        seed: int = 0,
        mix: bool = True,
    ) -> None:
        super().__init__()
        if not task_indices:
            raise SelftuneError("the multi-task sampler needs at least one task")
        if batch_size < 1:
            raise SelftuneError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise SelftuneError(f"seed must not be negative, got {seed}")
        missing = [t for t in task_indices if t not in shares]
        extra = [t for t in shares if t not in task_indices]
        if missing or extra:
            raise SelftuneError(f"task shares do not match the tasks: missing {missing}, "
                                f"unknown {extra}")
        self.tasks = list(task_indices)
        self._indices = [np.asarray(task_indices[t], dtype=np.int64) for t in self.tasks]
        for task, idx in zip(self.tasks, self._indices, strict=True):
            if idx.size == 0:
                raise SelftuneError(f"task {task} has no examples")
        p = np.array([float(shares[t]) for t in self.tasks])
        if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise SelftuneError(f"task shares must be non-negative with a positive sum: "
                                f"{dict(shares)}")
        self.probabilities = p / p.sum()
        total = sum(idx.size for idx in self._indices)
        if num_batches is None:
            num_batches = math.ceil(total / batch_size)
        if num_batches < 1:
            raise SelftuneError(f"number of batches must be at least 1, got {num_batches}")
        self.batch_size, self.num_batches, self.seed, self.mix = batch_size, num_batches, seed, mix
        self.epoch = 0
        self._draw_counts: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        if epoch < 0:
            raise SelftuneError(f"epoch must not be negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        slot_tasks = self._slot_tasks(self.epoch)
        offsets = sum((self._counts(e) for e in range(self.epoch)),
                      np.zeros(len(self.tasks), dtype=np.int64))
        out = np.empty(slot_tasks.size, dtype=np.int64)
        for t in range(len(self.tasks)):
            where = np.flatnonzero(slot_tasks == t)
            if where.size:
                out[where] = self._stream(t, int(offsets[t]), where.size)
        for batch in out.reshape(self.num_batches, self.batch_size):
            yield batch.tolist()

    # ---- randomness, a function of (seed, epoch) only

    def _slot_tasks(self, epoch: int) -> np.ndarray:
        """The task of every example slot of the epoch, batch after batch."""
        rng = np.random.default_rng([self.seed, _TASK_DRAWS, epoch])
        n = len(self.tasks)
        if self.mix:
            return rng.choice(n, size=self.num_batches * self.batch_size, p=self.probabilities)
        per_batch = rng.choice(n, size=self.num_batches, p=self.probabilities)
        return np.repeat(per_batch, self.batch_size)

    def _counts(self, epoch: int) -> np.ndarray:
        """How many examples each task gives in ``epoch`` (cached: later epochs need it)."""
        if epoch not in self._draw_counts:
            self._draw_counts[epoch] = np.bincount(self._slot_tasks(epoch),
                                                   minlength=len(self.tasks))
        return self._draw_counts[epoch]

    def _stream(self, task: int, start: int, count: int) -> np.ndarray:
        """Items ``start .. start+count`` of the task's endless stream of shuffled passes."""
        idx = self._indices[task]
        first, last = start // idx.size, (start + count - 1) // idx.size
        passes = [idx[np.random.default_rng([self.seed, _SHUFFLES, task, k]).permutation(idx.size)]
                  for k in range(first, last + 1)]
        begin = start - first * idx.size
        return np.concatenate(passes)[begin:begin + count]


class ProcessChunks(Sampler[list[int]]):
    """Each global batch of ``batches`` as ``processes`` consecutive per-process chunks.

    Accelerate deals the batches of a batch sampler to the processes in turn (batch i to
    process i mod N), so process r gets chunk r of every global batch: N processes with a
    per-process batch B train on the same global batches as one process with batch N·B.
    With one process this is ``batches`` itself.
    """

    def __init__(self, batches: MultiTaskBatchSampler, processes: int) -> None:
        super().__init__()
        if batches.batch_size % processes:
            raise SelftuneError(f"a global batch of {batches.batch_size} cannot be split "
                                f"between {processes} processes")
        self.batches, self.processes = batches, processes
        self.batch_size = batches.batch_size // processes  # what Accelerate checks batches by

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches) * self.processes

    def __iter__(self) -> Iterator[list[int]]:
        size = self.batch_size
        for batch in self.batches:
            for rank in range(self.processes):
                yield batch[rank * size:(rank + 1) * size]
