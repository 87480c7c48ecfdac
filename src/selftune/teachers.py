"""Teachers made of the student's own past: a window of its last K snapshots, or an EMA.

Xu et al. 2020 (arXiv:2002.10345) average the student's last K states, either their parameters
(SDA: one teacher model) or their outputs (SDV: a vote of K models). Snapshots are kept on the
CPU; the teacher that runs forward passes is one model copy on the student's device, never
wrapped in DDP, in eval mode under ``no_grad``.
"""

from __future__ import annotations

import copy
from collections import deque

import torch
from torch import nn

from selftune.models.cls_norm import has_running_statistics

State = dict[str, torch.Tensor]


def float_state(model: nn.Module) -> State:
    """The model's floating-point parameters and buffers (integer buffers never change)."""
    return {name: t for name, t in model.state_dict().items() if t.is_floating_point()}


@torch.no_grad()
def load_float_state(model: nn.Module, state: State) -> None:
    """Copy ``state`` into the model's tensors in place (one fused copy per device)."""
    targets = model.state_dict()
    names = list(state)
    torch._foreach_copy_([targets[n] for n in names], [state[n] for n in names])


def make_teacher_shell(student: nn.Module, dropout: bool = False) -> nn.Module:
    """A frozen copy of the student on its device, for teacher forward passes.

    Eval mode, unless ``dropout`` (--teacher-dropout): then the teacher runs in training mode
    for its dropout, but modules with running statistics (a [CLS] batchnorm or IsoBN) stay in
    eval mode, so the teacher neither normalizes with the statistics of a batch nor updates
    statistics that are the average of the student's.
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.train(dropout)
    for module in teacher.modules():
        if has_running_statistics(module):
            module.eval()
    return teacher


class SnapshotWindow:
    """The last ``k`` snapshots of a model, oldest first, and their average.

    ``push`` copies the model's floating-point state to the CPU; once the window is full, the
    oldest snapshot's memory is reused, so the window never holds more than ``k`` copies. The
    average is always the direct mean of the snapshots there are (no running sum that could
    drift: one public reimplementation's running update ends with a near-zero teacher), and
    ``average_into`` accumulates it in the teacher's own tensors, without another copy.
    """

    def __init__(self, k: int, storage_dtype: torch.dtype = torch.float32) -> None:
        if k < 1:
            raise ValueError("the snapshot window needs k >= 1")
        self.k = k  # number of snapshots kept
        self.storage_dtype = storage_dtype  # dtype of the CPU copies
        self._snapshots: deque[State] = deque()

    def __len__(self) -> int:
        return len(self._snapshots)

    @torch.no_grad()
    def push(self, model_or_state: nn.Module | State) -> None:
        state = model_or_state if isinstance(model_or_state, dict) else float_state(model_or_state)
        if len(self._snapshots) == self.k:
            snapshot = self._snapshots.popleft()
            names = list(snapshot)
            targets, sources = [snapshot[n] for n in names], [state[n] for n in names]
            if sources[0].device == targets[0].device:
                torch._foreach_copy_(targets, sources)
            else:  # a GPU student, CPU snapshots
                for target, source in zip(targets, sources, strict=True):
                    target.copy_(source)
        else:
            snapshot = {n: t.detach().to("cpu", self.storage_dtype, copy=True)
                        for n, t in state.items()}
        self._snapshots.append(snapshot)

    def snapshots(self) -> list[State]:
        """Oldest first."""
        return list(self._snapshots)

    @torch.no_grad()
    def average_into(self, model: nn.Module) -> None:
        """Load the mean of the window into ``model``'s tensors, in place."""
        if not self._snapshots:
            raise RuntimeError("the snapshot window is empty")
        targets = model.state_dict()
        names = list(self._snapshots[0])
        total = [targets[n] for n in names]
        device = total[0].device

        def tensors(snapshot: State) -> list[torch.Tensor]:
            return [snapshot[n].to(device, non_blocking=True) for n in names]

        torch._foreach_copy_(total, tensors(self._snapshots[0]))
        for snapshot in list(self._snapshots)[1:]:
            torch._foreach_add_(total, tensors(snapshot))
        if len(self._snapshots) > 1:
            torch._foreach_div_(total, float(len(self._snapshots)))

    def state_dict(self) -> State:
        """Flat tensors for a safetensors checkpoint."""
        return {f"snapshot.{i}.{name}": t for i, snap in enumerate(self._snapshots)
                for name, t in snap.items()}

    def load_state_dict(self, flat: State) -> None:
        by_index: dict[int, State] = {}
        for key, tensor in flat.items():
            if key.startswith("snapshot."):
                _, index, name = key.split(".", 2)
                by_index.setdefault(int(index), {})[name] = tensor
        self._snapshots = deque(by_index[i] for i in sorted(by_index))


class EmaAverage:
    """Exponential moving average of a model's state: θ̃ ← d·θ̃ + (1 − d)·θ.

    The average lives in the tensors of ``average_model`` itself (the teacher, a copy of the
    student to begin with), updated in place: the teacher costs the EMA's one model copy and no
    other. The decay warms up as d = min(max_decay, (1 + t) / (10 + t)), t = updates done
    before this one (the variant of public SDA reimplementations, e.g. lonePatient/BERT-SDA).
    """

    def __init__(self, average_model: nn.Module, max_decay: float = 0.995) -> None:
        self.average_model = average_model  # holds θ̃
        self.max_decay = max_decay  # the decay's ceiling
        self.updates = 0  # updates so far (t)

    @property
    def average(self) -> State:
        # Looked up each time: moving the model to a device replaces its tensors.
        return float_state(self.average_model)

    def decay(self) -> float:
        return min(self.max_decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state, average = float_state(model), self.average
        names = list(average)
        torch._foreach_lerp_([average[n] for n in names], [state[n] for n in names],
                             1.0 - self.decay())
        self.updates += 1

    def state_dict(self) -> State:
        return {**{f"ema.{n}": t for n, t in self.average.items()},
                "ema_updates": torch.tensor(self.updates)}

    def load_state_dict(self, flat: State) -> None:
        self.updates = int(flat["ema_updates"])
        load_float_state(self.average_model, {name.removeprefix("ema."): tensor
                                              for name, tensor in flat.items()
                                              if name.startswith("ema.")})


# --------------------------------------------------------------------------------------------
# Teachers of self-distillation: one interface, three ways to average the student's past
# --------------------------------------------------------------------------------------------


class PastTeacher:
    """A teacher made of the student's past states, for one run.

    The Trainer's events reach it through the objective: ``start`` when training begins (or
    resumes), ``before_update(student, t)`` while the student still holds θ_t, about to be
    overwritten, and ``after_update(student, t)`` once θ_t is in place. Every ``interval``-th
    state is a snapshot. With ``skip_initial``, θ_0 (whose head is random) never enters the
    teacher, and the teacher is not ``ready`` until it holds a later state.

    ``model`` is the one model copy that runs the teacher's forward passes: on the student's
    device, frozen, never wrapped in DDP.
    """

    name = "teacher"

    def __init__(self, student: nn.Module, interval: int = 1, dropout: bool = False,
                 skip_initial: bool = False) -> None:
        self.interval = interval  # a snapshot every N optimizer steps
        self.skip_initial = skip_initial  # θ_0 is no snapshot
        self.model = make_teacher_shell(student, dropout=dropout)
        self._started = False

    def start(self, student: nn.Module) -> None:
        self.model.to(next(student.parameters()).device)  # the Trainer has placed the student
        if self._started:  # resumed: the state came from the checkpoint
            self._refresh()
            return
        self._started = True
        # Until a state is taken, the teacher is the initial model itself.
        load_float_state(self.model, float_state(student))

    def is_snapshot(self, step: int) -> bool:
        return step % self.interval == 0 and not (step == 0 and self.skip_initial)

    def before_update(self, student: nn.Module, step: int) -> None: ...

    def after_update(self, student: nn.Module, step: int) -> None: ...

    @property
    def ready(self) -> bool:
        """Whether the teacher holds a state to distil from."""
        return not self.skip_initial

    @torch.no_grad()
    def logits(self, features: dict) -> torch.Tensor:
        return self.model(**features).logits

    def averaged_model(self) -> nn.Module:
        """The teacher as one model (its parameters averaged), for evaluation and saving."""
        return self.model

    def members(self) -> list[State]:
        """The states whose outputs a vote averages (none for a single-model teacher)."""
        return []

    def _refresh(self) -> None: ...

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None: ...


class WindowAverageTeacher(PastTeacher):
    """sda: the parameter average of the last K snapshots, θ̃_t = mean(θ_{t−1} … θ_{t−K})
    (fewer while fewer exist). A state enters the window just before the update that
    overwrites it, so the student is never part of its own teacher; the window and the teacher
    model are K + 1 model copies in all."""

    name = "parameter average of the last K snapshots"

    def __init__(self, student: nn.Module, k: int = 3, **options) -> None:
        super().__init__(student, **options)
        self.window = SnapshotWindow(k)

    def before_update(self, student: nn.Module, step: int) -> None:
        if self.is_snapshot(step):
            self.window.push(student)
            self._refresh()

    @property
    def ready(self) -> bool:
        return not self.skip_initial or len(self.window) > 0

    def averaged_model(self) -> nn.Module:
        if len(self.window):
            self.window.average_into(self.model)
        return self.model

    def members(self) -> list[State]:
        return self.window.snapshots()

    def _refresh(self) -> None:
        if len(self.window):
            self.window.average_into(self.model)

    def state_dict(self) -> State:
        return self.window.state_dict()

    def load_state_dict(self, state: State) -> None:
        self.window.load_state_dict(state)


class WindowVoteTeacher(WindowAverageTeacher):
    """sdv: the mean of the logits of the last K snapshot models (one model shell, K parameter
    loads per batch: K forward passes without K model copies on the device)."""

    name = "output vote of the last K snapshots"

    def _refresh(self) -> None:
        pass  # the shell is loaded member by member at each forward pass

    @torch.no_grad()
    def logits(self, features: dict) -> torch.Tensor:
        members = self.members()
        if not members:  # nothing taken yet: the shell holds the initial model
            return self.model(**features).logits.float()
        total = None
        for snapshot in members:
            load_float_state(self.model, snapshot)
            logits = self.model(**features).logits.float()
            total = logits if total is None else total + logits
        return total / len(members)


class EmaTeacher(PastTeacher):
    """ema: an exponential moving average of the student, updated after every ``interval``-th
    update; the average lives in the teacher model's own tensors (one model copy). With
    ``skip_initial`` the average starts at the first snapshot instead of θ_0."""

    name = "exponential moving average"

    def __init__(self, student: nn.Module, max_decay: float = 0.995, **options) -> None:
        super().__init__(student, **options)
        self.ema = EmaAverage(self.model, max_decay)

    def after_update(self, student: nn.Module, step: int) -> None:
        if not self.is_snapshot(step):
            return
        if self.skip_initial and self.ema.updates == 0:
            load_float_state(self.model, float_state(student))  # the average starts here
            self.ema.updates = 1
        else:
            self.ema.update(student)

    @property
    def ready(self) -> bool:
        return not self.skip_initial or self.ema.updates > 0

    def state_dict(self) -> State:
        return self.ema.state_dict()

    def load_state_dict(self, state: State) -> None:
        self.ema.load_state_dict(state)


TEACHERS: dict[str, type[PastTeacher]] = {
    "sda": WindowAverageTeacher, "sdv": WindowVoteTeacher, "ema": EmaTeacher}


def make_teacher(kind: str, student: nn.Module, k: int = 3, interval: int = 1,
                 dropout: bool = False, skip_initial: bool = False) -> PastTeacher:
    """The teacher of a self-distillation strategy: ``sda``, ``sdv`` or ``ema``."""
    if kind not in TEACHERS:
        raise ValueError(f"unknown self-distillation teacher {kind!r}; choose one of "
                         f"{', '.join(TEACHERS)}")
    options = {"interval": interval, "dropout": dropout, "skip_initial": skip_initial}
    if kind == "ema":
        return EmaTeacher(student, **options)
    return TEACHERS[kind](student, k=k, **options)
