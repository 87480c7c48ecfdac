"""Task shares and the multi-task batch sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch.utils.data import DataLoader

from selftune.errors import SelftuneError
from selftune.multitask.sampling import MultiTaskBatchSampler, task_shares

SIZES = {"big": 4000, "mid": 500, "small": 60}


def contiguous(sizes: dict[str, int]) -> dict[str, list[int]]:
    """Each task's indices in the concatenation of the datasets, in order."""
    out, start = {}, 0
    for task, n in sizes.items():
        out[task] = list(range(start, start + n))
        start += n
    return out


def task_of(index: int, indices: dict[str, list[int]]) -> str:
    return next(t for t, idx in indices.items() if idx[0] <= index <= idx[-1])


def test_task_shares() -> None:
    power = task_shares(SIZES)
    total = sum(n ** 0.75 for n in SIZES.values())
    assert all(math.isclose(power[t], n ** 0.75 / total) for t, n in SIZES.items())
    assert list(power) == list(SIZES)
    prop = task_shares(SIZES, "proportional")
    assert math.isclose(prop["small"], 60 / 4560)
    assert task_shares(SIZES, "uniform") == {t: 1 / 3 for t in SIZES}
    assert math.isclose(task_shares(SIZES, alpha=0.5)["big"], 4000 ** 0.5 / sum(
        n ** 0.5 for n in SIZES.values()))


@pytest.mark.parametrize(("sizes", "method"), [
    ({}, "power"), ({"a": 0}, "power"), ({"a": 5, "b": -1}, "uniform"), ({"a": 5}, "square"),
])
def test_task_shares_errors(sizes, method) -> None:
    with pytest.raises(SelftuneError):
        task_shares(sizes, method)


@pytest.mark.parametrize("method", ["power", "proportional", "uniform"])
def test_empirical_shares(method: str) -> None:
    indices = contiguous(SIZES)
    shares = task_shares(SIZES, method)
    sampler = MultiTaskBatchSampler(indices, 50, shares, num_batches=400, seed=1)
    flat = np.concatenate([np.asarray(b) for b in sampler])  # 20k draws
    assert flat.size == 20_000
    bounds = np.cumsum([0, *SIZES.values()])
    counts = np.histogram(flat, bins=bounds)[0]
    for (task, share), count in zip(shares.items(), counts, strict=True):
        assert abs(count / flat.size - share) < 0.015, (task, count / flat.size, share)


def test_indices_belong_to_their_task_and_small_tasks_repeat() -> None:
    indices = {"a": [10, 3, 7], "b": list(range(100, 140)), "c": [1, 2]}
    sampler = MultiTaskBatchSampler(indices, 8, task_shares({"a": 3, "b": 40, "c": 2}, "uniform"),
                                    num_batches=30, seed=0)
    allowed = {i for idx in indices.values() for i in idx}
    seen = [i for batch in sampler for i in batch]
    assert set(seen) <= allowed
    assert set(seen) == allowed  # 240 draws, a third each: every index comes up
    # a stream is a sequence of full shuffled passes: the first |a| draws of "a" are a permutation
    a_draws = [i for i in seen if i in {10, 3, 7}]
    assert sorted(a_draws[:3]) == [3, 7, 10] and sorted(a_draws[3:6]) == [3, 7, 10]


def test_large_task_is_covered_without_repeats_before_a_full_pass() -> None:
    indices = {"a": list(range(50)), "b": list(range(50, 60))}
    sampler = MultiTaskBatchSampler(indices, 4, {"a": 0.5, "b": 0.5}, num_batches=5, seed=3)
    draws = []
    for epoch in range(6):  # the stream of "a" continues across epochs
        sampler.set_epoch(epoch)
        draws += [i for batch in sampler for i in batch if i < 50]
    assert len(draws) >= 50
    assert sorted(draws[:50]) == list(range(50))


def test_len_and_default_num_batches() -> None:
    sampler = MultiTaskBatchSampler(contiguous(SIZES), 32, task_shares(SIZES), None, seed=0)
    assert len(sampler) == math.ceil(4560 / 32)
    batches = list(sampler)
    assert len(batches) == len(sampler) and all(len(b) == 32 for b in batches)
    assert all(isinstance(i, int) for i in batches[0])


def test_deterministic_and_epoch_aware() -> None:
    def make(seed: int) -> MultiTaskBatchSampler:
        return MultiTaskBatchSampler(contiguous(SIZES), 16, task_shares(SIZES), 20, seed=seed)

    first, again = make(7), make(7)
    assert list(first) == list(again)
    assert list(first) != list(make(8))
    epoch0 = list(first)
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0
    fresh = make(7)
    fresh.set_epoch(1)  # the same epoch-1 batches without iterating epoch 0 first
    assert list(fresh) == epoch1
    first.set_epoch(0)
    assert list(first) == epoch0


def test_single_task_batches() -> None:
    indices = contiguous(SIZES)
    sampler = MultiTaskBatchSampler(indices, 10, task_shares(SIZES), 200, seed=2, mix=False)
    tasks_per_batch = [{task_of(i, indices) for i in batch} for batch in sampler]
    assert all(len(t) == 1 for t in tasks_per_batch)
    assert {next(iter(t)) for t in tasks_per_batch} == set(SIZES)


def test_mixed_batches_mix() -> None:
    indices = contiguous(SIZES)
    sampler = MultiTaskBatchSampler(indices, 32, task_shares(SIZES, "uniform"), 5, seed=0)
    assert all(len({task_of(i, indices) for i in batch}) > 1 for batch in sampler)


def test_works_as_a_batch_sampler() -> None:
    data = list(range(100, 130))
    indices = {"a": list(range(20)), "b": list(range(20, 30))}
    sampler = MultiTaskBatchSampler(indices, 4, {"a": 2, "b": 1}, None, seed=0)
    batches = list(DataLoader(data, batch_sampler=sampler))
    assert len(batches) == math.ceil(30 / 4)
    assert all(b.shape == (4,) for b in batches)


@pytest.mark.parametrize("kwargs", [
    {"batch_size": 0}, {"shares": {"a": 1.0}}, {"shares": {"a": 1.0, "b": 1.0, "c": 1.0}},
    {"shares": {"a": -1.0, "b": 2.0}}, {"num_batches": 0}, {"task_indices": {"a": [], "b": [1]}},
])
def test_sampler_errors(kwargs) -> None:
    args = {"task_indices": {"a": [0], "b": [1]}, "batch_size": 2,
            "shares": {"a": 0.5, "b": 0.5}, "num_batches": None, "seed": 0, **kwargs}
    with pytest.raises(SelftuneError):
        MultiTaskBatchSampler(**args)


def test_process_chunks_deal_each_global_batch_to_the_processes():
    from selftune.multitask.sampling import ProcessChunks

    batches = MultiTaskBatchSampler({"a": range(0, 30), "b": range(30, 40)}, batch_size=6,
                                    shares={"a": 0.5, "b": 0.5}, seed=3)
    batches.set_epoch(1)
    chunks = ProcessChunks(batches, processes=3)
    assert len(chunks) == 3 * len(batches) and chunks.batch_size == 2
    chunks.set_epoch(1)
    dealt = list(chunks)
    # Accelerate gives chunk i to process i mod 3: together they are the global batch.
    for k, batch in enumerate(batches):
        assert [i for r in range(3) for i in dealt[3 * k + r]] == batch
    with pytest.raises(SelftuneError, match="cannot be split"):
        ProcessChunks(batches, processes=4)
