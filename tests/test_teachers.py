"""The snapshot window and the EMA: their averages against direct computations."""

from __future__ import annotations

import copy

import torch

from selftune.teachers import EmaAverage, SnapshotWindow, float_state, load_float_state


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g) * 100}


class TwoTensors(torch.nn.Module):
    """A model whose state has the names of random_state()."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(7, 5))
        self.b = torch.nn.Parameter(torch.zeros(5))


def test_window_mean_equals_direct_mean_after_many_evictions():
    """The teacher the window builds (average_into, as training does) is the direct mean of
    the last k states at every push, also after 200 pushes and evictions."""
    window = SnapshotWindow(k=3)
    teacher = TwoTensors()
    states = [random_state(i) for i in range(200)]
    for i, state in enumerate(states):
        window.push(state)
        window.average_into(teacher)
        last = states[max(0, i - 2): i + 1]
        for name, tensor in float_state(teacher).items():
            direct = torch.stack([s[name] for s in last]).double().mean(0).float()
            torch.testing.assert_close(tensor, direct, rtol=1e-6, atol=1e-5)
    assert len(window) == 3
    # The mean is not near zero (a wrong running update drifts toward 0, as one public
    # reimplementation does).
    assert teacher.b.abs().mean() > 10


def test_average_into_a_model_is_the_direct_mean_and_memory_is_reused():
    model = torch.nn.Linear(5, 7)
    window = SnapshotWindow(k=3)
    states = []
    for i in range(6):
        state = {"weight": random_state(i)["w"], "bias": torch.randn(7) + 50}
        states.append(state)
        window.push(state)
        if i == 2:  # full: from now on a push reuses the evicted snapshot's tensors
            pointers = {t.data_ptr() for snap in window.snapshots() for t in snap.values()}
    assert {t.data_ptr() for snap in window.snapshots() for t in snap.values()} == pointers
    window.average_into(model)
    for name, tensor in float_state(model).items():
        direct = torch.stack([s[name] for s in states[-3:]]).double().mean(0).float()
        torch.testing.assert_close(tensor, direct, rtol=1e-6, atol=1e-6)


def test_window_copies_and_keeps_snapshots_oldest_first():
    window = SnapshotWindow(k=2)
    state = random_state(0)
    window.push(state)
    state["w"].add_(1.0)  # later changes to the model must not leak into the snapshot
    window.push(state)
    first, second = window.snapshots()
    torch.testing.assert_close(second["w"] - first["w"], torch.ones(7, 5))


def test_window_state_dict_round_trip():
    window = SnapshotWindow(k=3)
    for i in range(5):
        window.push(random_state(i))
    restored = SnapshotWindow(k=3)
    restored.load_state_dict(window.state_dict())
    assert len(restored) == 3
    for a, b in zip(window.snapshots(), restored.snapshots(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    teacher, again = TwoTensors(), TwoTensors()
    window.average_into(teacher)
    restored.average_into(again)
    torch.testing.assert_close(float_state(again), float_state(teacher), rtol=0, atol=0)


def test_ema_matches_the_formula():
    model = torch.nn.Linear(3, 2)
    teacher = copy.deepcopy(model)
    ema = EmaAverage(teacher, max_decay=0.995)
    expected = {n: t.clone() for n, t in float_state(model).items()}
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.995, (1 + t) / (10 + t))
        for name, value in float_state(model).items():
            expected[name] = decay * expected[name] + (1 - decay) * value
        ema.update(model)
    torch.testing.assert_close(ema.average, expected)
    # The average is the teacher's own parameters, not a copy beside them.
    torch.testing.assert_close(float_state(teacher), expected)
    assert {t.data_ptr() for t in ema.average.values()} == \
        {p.data_ptr() for p in teacher.parameters()}
    restored = EmaAverage(torch.nn.Linear(3, 2))
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 30 and restored.decay() == ema.decay()
    torch.testing.assert_close(restored.average, ema.average)


def test_load_float_state_copies_in_place():
    model = torch.nn.Linear(3, 2)
    weight = model.weight
    load_float_state(model, {"weight": torch.zeros(2, 3), "bias": torch.ones(2)})
    assert model.weight is weight and torch.all(model.weight == 0)
    assert torch.all(model.bias == 1)
