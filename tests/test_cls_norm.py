"""[CLS] normalizers (docs/methods.md §3) and the [CLS] statistics they use."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

from selftune.errors import SelftuneError
from selftune.models.cls_norm import (
    CLS_NORM_KINDS,
    STANDARDIZE_EPS,
    ClsStats,
    IsoBN,
    compute_cls_stats,
    make_cls_norm,
)

H = 8


def population_stats(x: torch.Tensor) -> ClsStats:
    return ClsStats(mean=x.mean(0), std=x.std(0, unbiased=False))


def correlated_batch(gen: torch.Generator, n: int = 32, h: int = H) -> torch.Tensor:
    """Non-centred data with unequal scales and correlated dimensions (like a pre-trained [CLS])."""
    mix = torch.randn(h, h, generator=gen) * 0.5 + torch.eye(h)
    scales = torch.linspace(0.5, 4.0, h)
    return (torch.randn(n, h, generator=gen) @ mix) * scales + torch.linspace(-2.0, 3.0, h)


@pytest.fixture()
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --- the simple normalizers ----------------------------------------------------------------------

def test_none_is_identity(gen):
    x = correlated_batch(gen)
    assert torch.equal(make_cls_norm("none", H)(x), x)


def test_center_gives_zero_mean_over_the_stats_data(gen):
    x = correlated_batch(gen)
    out = make_cls_norm("center", H, population_stats(x))(x)
    assert x.mean(0).abs().max() > 0.5  # the test would notice a no-op
    torch.testing.assert_close(out.mean(0), torch.zeros(H), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0), x.std(0))  # only shifted


def test_standardize_gives_zero_mean_unit_variance(gen):
    x = correlated_batch(gen)
    stats = population_stats(x)
    out = make_cls_norm("standardize", H, stats)(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(H), atol=1e-5, rtol=0)
    # Unit variance up to the eps under the square root: std / sqrt(std² + eps).
    expected = stats.std / torch.sqrt(stats.std**2 + STANDARDIZE_EPS)
    assert expected.min() > 0.999
    torch.testing.assert_close(out.std(0, unbiased=False), expected, atol=1e-5, rtol=0)


def test_standardize_bounds_the_gain_of_constant_dimensions(gen):
    x = correlated_batch(gen)
    x[:, 0] = 3.0  # a dimension the pre-trained model never varies
    norm = make_cls_norm("standardize", H, population_stats(x))
    moved = x.clone().requires_grad_(True)
    norm(moved).sum().backward()
    # At most 1/sqrt(eps) (~316), never the 1/std of a dimension whose std is ~0.
    assert moved.grad[:, 0].abs().max() <= STANDARDIZE_EPS ** -0.5 * (1 + 1e-6)


def test_batchnorm_batch_stats_in_training_running_stats_in_eval(gen):
    norm = make_cls_norm("batchnorm", H)
    assert isinstance(norm, torch.nn.BatchNorm1d)
    assert norm.momentum == 0.1 and not norm.affine and list(norm.parameters()) == []
    norm.train()
    for _ in range(3):
        x = correlated_batch(gen)
        out = norm(x)
        torch.testing.assert_close(out.mean(0), torch.zeros(H), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(H), atol=1e-3, rtol=0)
    norm.eval()
    x = correlated_batch(gen)
    expected = (x - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
    torch.testing.assert_close(norm(x), expected)
    assert out.mean(0).abs().max() < 1e-4 and norm(x).mean(0).abs().max() > 0.05


def test_layernorm_normalizes_each_row(gen):
    norm = make_cls_norm("layernorm", H)
    assert list(norm.parameters()) == []
    out = norm(correlated_batch(gen))
    torch.testing.assert_close(out.mean(1), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)


# --- IsoBN -------------------------------------------------------------------------------------

def reference_isobn(state: dict, x: torch.Tensor, training: bool, momentum: float = 0.05,
                    eps: float = 1e-3, beta: float = 0.5) -> torch.Tensor:
    """The published formula, written out directly in float64 (state: running cov/std)."""
    x = x.double()
    n, d = x.shape
    if training:
        c = x - x.mean(0)
        batch_cov = torch.zeros(d, d, dtype=torch.float64)
        for k in range(n):
            batch_cov += torch.outer(c[k], c[k]) / n
        batch_std = torch.sqrt((c * c).sum(0) / n)
        state["cov"] = (1 - momentum) * state["cov"] + momentum * batch_cov
        state["std"] = (1 - momentum) * state["std"] + momentum * batch_std
    cov, std = state["cov"], state["std"]
    scale = torch.zeros(d, dtype=torch.float64)
    for i in range(d):
        gamma = sum(min(max(cov[i, j] / (std[i] * std[j]), -1.0), 1.0) ** 2 for j in range(d)) / d
        scale[i] = (gamma * std[i] + eps) ** (-beta)
    before = sum(cov[i, i] for i in range(d))
    after = sum(cov[i, i] * scale[i] ** 2 for i in range(d))
    scale = scale * (before / (after + eps)) ** 0.5
    return x * scale


def test_isobn_matches_the_published_formula(gen):
    norm = make_cls_norm("isobn", H)
    assert isinstance(norm, IsoBN) and list(norm.parameters()) == []
    assert (norm.momentum, norm.eps, norm.beta) == (0.05, 1e-3, 0.5)
    state = {"cov": torch.zeros(H, H, dtype=torch.float64),
             "std": torch.zeros(H, dtype=torch.float64)}
    norm.train()
    for _ in range(5):
        x = correlated_batch(gen)
        expected = reference_isobn(state, x, training=True)
        torch.testing.assert_close(norm(x).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_cov.double(), state["cov"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_std.double(), state["std"], rtol=1e-5, atol=1e-6)
    norm.eval()
    x = correlated_batch(gen)
    frozen = norm.running_cov.clone()
    expected = reference_isobn(state, x, training=False)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(norm.running_cov, frozen)  # eval does not update the statistics
    assert norm.scale().std() > 0.05  # the scale is far from uniform on this data


def test_isobn_scale_is_detached(gen):
    norm = IsoBN(H)
    norm.train()
    for _ in range(3):
        norm(correlated_batch(gen))
    x = correlated_batch(gen).requires_grad_(True)
    out = norm(x)  # training step: the statistics now depend on this batch
    weights = torch.randn(out.shape, generator=gen)
    (out * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights * norm.scale())
    assert not norm.running_cov.requires_grad and not norm.running_std.requires_grad


def test_isobn_preserves_total_variance(gen):
    norm = IsoBN(H)
    norm.train()
    for _ in range(5):
        norm(correlated_batch(gen) * 10)
    var = norm.running_cov.diagonal().double()
    scale = norm.scale().double()
    # documented: sum_i C_ii (m a_i)^2 = sum_i C_ii, up to eps in the denominator of m
    torch.testing.assert_close((var * scale**2).sum(), var.sum(), rtol=1e-4, atol=0)
    assert (scale - 1).abs().max() > 0.1  # non-trivial: the dimensions are rescaled unequally


def test_isobn_eval_before_training_is_identity_and_first_batch_init(gen):
    x = correlated_batch(gen)
    fresh = IsoBN(H).eval()
    assert torch.equal(fresh(x), x)
    norm = IsoBN(H, init_from_first_batch=True).train()
    norm(x)
    c = x - x.mean(0)
    torch.testing.assert_close(norm.running_cov, c.t() @ c / x.shape[0])
    torch.testing.assert_close(norm.running_std, x.std(0, unbiased=False))


# --- saving and loading --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CLS_NORM_KINDS)
def test_state_dict_round_trip_through_safetensors(kind, gen, tmp_path):
    data = correlated_batch(gen)
    norm = make_cls_norm(kind, H, population_stats(data))
    norm.train()
    for _ in range(3):
        norm(correlated_batch(gen))
    norm.eval()
    path = tmp_path / "norm.safetensors"
    save_file(norm.state_dict(), str(path))
    placeholder = ClsStats(mean=torch.zeros(H), std=torch.ones(H))
    fresh = make_cls_norm(kind, H, placeholder).eval()
    x = correlated_batch(gen)
    if kind in ("center", "standardize", "batchnorm", "isobn"):
        assert not torch.allclose(fresh(x), norm(x))  # the state really is in the file
    fresh.load_state_dict(load_file(str(path)))
    fresh.eval()
    assert torch.equal(fresh(x), norm(x))


# --- [CLS] statistics ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert() -> BertModel:
    # initializer_range 0.2 (default 0.02): with tiny random weights [CLS] barely varies (std ~3e-4)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, initializer_range=0.2)
    return BertModel(config)


def make_examples(n: int = 10, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(1, 8, (1,), generator=gen))
        middle = torch.randint(5, 50, (length,), generator=gen).tolist()
        examples.append([2, *middle, 3])  # [CLS] ... [SEP]
    return examples


def make_batches(examples: list[list[int]], batch_size: int, pad_to: int | None = None,
                 labels: bool = False) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = pad_to or max(len(e) for e in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, example in enumerate(chunk):
            ids[row, :len(example)] = torch.tensor(example)
            mask[row, :len(example)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        if labels:
            batch["labels"] = torch.zeros(len(chunk), dtype=torch.long)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("source", ["cls", "pooler"])
def test_cls_stats_match_a_direct_computation_and_ignore_padding(tiny_bert, source):
    examples = make_examples()
    tiny_bert.train()  # compute_cls_stats must switch dropout off, then restore the mode
    stats = compute_cls_stats(tiny_bert, make_batches(examples, 4, labels=True), source=source)
    assert tiny_bert.training and all(m.training for m in tiny_bert.modules())
    padded = compute_cls_stats(tiny_bert, make_batches(examples, 3, pad_to=20), source=source)
    torch.testing.assert_close(padded.mean, stats.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.std, stats.std, atol=1e-5, rtol=1e-5)

    tiny_bert.eval()
    with torch.no_grad():
        reps = []
        for example in examples:  # one at a time: no padding at all
            out = tiny_bert(input_ids=torch.tensor([example]))
            reps.append(out.last_hidden_state[0, 0] if source == "cls" else out.pooler_output[0])
    tiny_bert.train()
    reps = torch.stack(reps)
    torch.testing.assert_close(stats.mean, reps.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.std, reps.std(0, unbiased=False), atol=1e-5, rtol=1e-5)
    assert stats.std.min() > 0.02  # [CLS] varies, so the comparisons above mean something

    standardized = make_cls_norm("standardize", 32, stats)(reps)
    torch.testing.assert_close(standardized.mean(0), torch.zeros(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardized.std(0, unbiased=False),
                               stats.std / torch.sqrt(stats.std**2 + STANDARDIZE_EPS), atol=1e-4,
                               rtol=0)


def test_cls_stats_of_a_classifier_use_its_encoder():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)
    classifier = BertForSequenceClassification(config)
    batches = make_batches(make_examples(6), 3, labels=True)
    stats = compute_cls_stats(classifier, batches)
    direct = compute_cls_stats(classifier.base_model, batches)
    assert torch.equal(stats.mean, direct.mean) and torch.equal(stats.std, direct.std)


@pytest.mark.parametrize("kind", ["batchnorm", "isobn"])
@pytest.mark.parametrize("dropout", [False, True])
def test_a_teacher_of_averaged_snapshots_normalizes_like_the_student(kind, dropout):
    """The teacher shell is copied before training (no statistics yet) and then only receives
    the snapshots' float tensors; it must still normalize with the statistics it received, in
    eval mode even when it runs with dropout, and without updating them."""
    from selftune.models.heads import install_cls_norm
    from selftune.teachers import SnapshotWindow, make_teacher_shell

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    student = BertForSequenceClassification(config)
    install_cls_norm(student, kind)
    teacher = make_teacher_shell(student, dropout=dropout)
    assert teacher.base_model.pooler.cls_norm.training is False
    ids = torch.randint(5, 50, (8, 6))
    student.train()
    for _ in range(3):  # training forwards fill the running statistics
        student(input_ids=ids)
    window = SnapshotWindow(1)
    window.push(student)
    window.average_into(teacher)
    before = {k: v.clone() for k, v in teacher.base_model.pooler.cls_norm.state_dict().items()}
    with torch.no_grad():
        taught = teacher(input_ids=ids).logits
        expected = student.eval()(input_ids=ids).logits
    torch.testing.assert_close(taught, expected)
    after = teacher.base_model.pooler.cls_norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- errors ------------------------------------------------------------------------------------

def test_bad_kind_and_missing_stats_raise():
    with pytest.raises(SelftuneError, match="valid values: none, center, standardize"):
        make_cls_norm("whiten", H)
    for kind in ("center", "standardize"):
        with pytest.raises(SelftuneError, match="statistics"):
            make_cls_norm(kind, H)
    with pytest.raises(SelftuneError, match="hidden size"):
        make_cls_norm("center", H, ClsStats(mean=torch.zeros(H + 1), std=torch.ones(H + 1)))
    with pytest.raises(SelftuneError, match="same length"):
        ClsStats(mean=torch.zeros(H), std=torch.ones(H + 1))


def test_bad_source_and_empty_data_raise(tiny_bert):
    with pytest.raises(SelftuneError, match="valid values: cls, pooler"):
        compute_cls_stats(tiny_bert, [], source="mean")
    with pytest.raises(SelftuneError, match="no examples"):
        compute_cls_stats(tiny_bert, [])
