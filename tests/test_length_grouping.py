"""Length-grouped batches: fewer padding tokens, an order fixed by (seed, epoch), exact resume."""

from __future__ import annotations

import random

import numpy as np
import pytest

from selftune.data.length_grouping import EpochSeededLengthGroupedSampler


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    return sum(len(order[i:i + batch_size]) * max(lengths[j] for j in order[i:i + batch_size])
               for i in range(0, len(order), batch_size))


def test_grouped_batches_hold_far_fewer_padding_tokens():
    rng = random.Random(0)
    lengths = [rng.randint(5, 128) for _ in range(3200)]
    sampler = EpochSeededLengthGroupedSampler(lengths, batch_size=32, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # every example once per epoch
    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    grouped, random_batches = (padded_tokens(o, lengths, 32) for o in (order, shuffled))
    assert grouped < 1.1 * sum(lengths) < random_batches / 1.4


def test_order_depends_only_on_seed_and_epoch():
    lengths = [random.Random(1).randint(1, 64) for _ in range(500)]

    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochSeededLengthGroupedSampler(lengths, batch_size=8, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    np.random.seed(123)  # the global RNGs play no part
    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)


def test_group_by_length_is_refused_for_multitask_runs():
    from selftune.errors import SelftuneError
    from selftune.multitask.training import MultiTaskConfig, check_multitask_options

    with pytest.raises(SelftuneError, match="single-task runs"):
        check_multitask_options(MultiTaskConfig(group_by_length=True))
