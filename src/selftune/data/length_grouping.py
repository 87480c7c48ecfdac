"""Length-grouped training batches whose order depends only on the seed and the epoch.

With dynamic padding a batch costs as much as its longest input times its size. Random batches
of GLUE tasks hold 1.5–3× more tokens than their examples (padding); batches of similar lengths
only ~1.05× (BENCHMARKS.md, Performance). ``transformers.trainer_pt_utils.LengthGroupedSampler``
does the grouping (megabatches of 50 batches sorted by length, the longest batch first), but
draws its permutation from the global RNG when the epoch starts. A resumed run starts that epoch
with another RNG state than the uninterrupted one, so its data order, and its result, would
differ. Here the permutation comes from a generator seeded by (seed, epoch), as Accelerate's
seedable sampler does for random batches, and every process draws the same one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochSeededLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Indices in length-grouped order, reproducible per (seed, epoch)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through Accelerate's data loader) before every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size,
                                               generator=generator))
