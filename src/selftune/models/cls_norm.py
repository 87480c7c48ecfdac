"""Normalizers for the [CLS] representation, applied before the classifier head.

What it computes: docs/methods.md §3. Zhou, Du & Ren (arXiv:1911.03918, withdrawn) observed that
pre-trained [CLS] embeddings concentrate on a few dimensions and are not zero-centred, so the
gradients through them can explode; normalizing [CLS] during fine-tuning helps. Each method here is
an ``nn.Module`` mapping a batch ``x`` of shape ``(batch, hidden)`` to the same shape:

* ``none``: identity (the baseline);
* ``center``: subtract a fixed per-dimension mean (computed once with :func:`compute_cls_stats`);
* ``standardize``: ``(x - mean) / sqrt(std² + 1e-5)`` with fixed statistics;
* ``batchnorm``: ``nn.BatchNorm1d`` without affine (PyTorch defaults: momentum 0.1, eps 1e-5);
  batch statistics in training, running statistics in evaluation;
* ``layernorm``: per-example ``nn.LayerNorm`` without affine (eps 1e-5);
* ``isobn``: isotropic batch normalization (Zhou, Lin & Ren, AAAI 2021), see :class:`IsoBN`.

Every statistic is a registered buffer, so it is part of ``state_dict()`` and survives a
safetensors save/load. Build a module with :func:`make_cls_norm`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selftune.errors import SelftuneError

CLS_NORM_KINDS: tuple[str, ...] = (
    "none", "center", "standardize", "batchnorm", "layernorm", "isobn",
)
CLS_SOURCES: tuple[str, ...] = ("cls", "pooler")
STANDARDIZE_EPS = 1e-5
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ClsStats:
    """Per-dimension mean and (population) std of [CLS] over a data set, shape ``(hidden,)``."""

    mean: Tensor
    std: Tensor

    def __post_init__(self) -> None:
        if self.mean.dim() != 1 or self.mean.shape != self.std.shape:
            raise SelftuneError(
                f"[CLS] statistics must be two vectors of the same length; got mean "
                f"{tuple(self.mean.shape)} and std {tuple(self.std.shape)}"
            )

    @property
    def hidden_size(self) -> int:
        return self.mean.shape[0]


class CenterNorm(nn.Module):
    """Subtract a fixed per-dimension mean (the pre-trained [CLS] is not zero-centred).

    The mean is a buffer: it is saved with the model and never trained. To rebuild a saved model,
    construct with a placeholder of the right length (e.g. zeros) and load the state dict.
    """

    def __init__(self, mean: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return x - self.mean.to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.mean.shape[0]}"


class StandardizeNorm(nn.Module):
    """``(x - mean) / sqrt(std² + eps)`` with fixed per-dimension statistics (buffers).

    ``eps`` (1e-5, BatchNorm's) bounds the gain of dimensions that barely vary: the last-layer
    [CLS] of the default model has three constant dimensions (std < 1e-8), which a plain
    division would amplify a million-fold as soon as fine-tuning moves them. Next to the std of
    the other dimensions (0.1 and more) it is negligible.
    """

    def __init__(self, mean: Tensor, std: Tensor, eps: float = STANDARDIZE_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def scale(self) -> Tensor:
        """The per-dimension factor applied after centring."""
        return torch.rsqrt(self.std.float() ** 2 + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) * self.scale().to(x.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.mean.shape[0]}, eps={self.eps}"


class IsoBN(nn.Module):
    """Isotropic batch normalization: rescale each dimension by its std and its correlations.

    Zhou, Lin & Ren, "IsoBN: Fine-Tuning BERT with Isotropic Batch Normalization", AAAI 2021
    (arXiv:2005.02178); followed here is the ``IsoBN`` class of the official code,
    github.com/INK-USC/IsoBN ``model.py`` (read, not copied); docs/methods.md §3.
    Per dimension ``i``, from the running covariance ``C`` and running std ``s``::

        corr  = clamp(C / (s sᵀ), -1, 1)
        γ_i   = mean_j corr_ij²
        a_i   = (γ_i · s_i + eps) ^ (-beta)
        m     = sqrt(Σ_i C_ii / (Σ_i C_ii a_i² + eps))
        y     = x · (m · a)            # (m · a) detached: no gradient through the statistics

    The factor ``m`` preserves the total variance: under the running covariance,
    ``Σ_i Var(y_i) = Σ_i C_ii · (m a_i)² = Σ_i C_ii`` up to the ``eps`` in the denominator of
    ``m``. No centering and no learnable affine. Dimensions that are strongly correlated with many
    others (large γ, the "dominating principal components") and large-std dimensions are shrunk.

    Details taken from the official code, where the paper/spec leave them open:

    * "std" is the standard deviation (not the variance): the square root of the biased (÷n)
      per-dimension variance of the batch. The covariance is also biased (÷n) and computed from
      the batch-centred input, which is detached. The running std is an exponential moving average
      of the batch stds (not the square root of the running covariance's diagonal).
    * Running update ``r ← r + momentum · (batch − r)``, momentum 0.05, from buffers initialised
      to zero. In training the batch statistics are folded in first and the batch is then
      normalized with the *running* statistics; in evaluation only the running statistics are
      used.
    * ``beta`` is the exponent (official default 0.5: ``scale = 1 / (γ·std + eps) ** beta``), and
      the same ``eps`` (1e-3) is used in the variance-preserving factor.

    Our own choices, where the official code is silent or undefined (both only change cases in
    which the official code returns NaN or is biased, and both are options):

    * Evaluating before any training step (no statistics yet; official: 0/0 = NaN) returns the
      input unchanged; a pair of dimensions with a zero running std gets correlation 0.
    * ``init_from_first_batch=False`` (default, as official) starts the running estimates at zero,
      which inflates the correlations of the first few dozen steps (they are clamped to ±1);
      ``True`` sets them to the first batch's statistics instead.
    """

    def __init__(
        self,
        hidden_size: int,
        momentum: float = 0.05,
        eps: float = 1e-3,
        beta: float = 0.5,
        init_from_first_batch: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.momentum = momentum
        self.eps = eps
        self.beta = beta
        self.init_from_first_batch = init_from_first_batch
        self.register_buffer("running_cov", torch.zeros(hidden_size, hidden_size))
        self.register_buffer("running_std", torch.zeros(hidden_size))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach().float()
            centred = x - x.mean(dim=0, keepdim=True)
            cov = centred.t() @ centred / x.shape[0]
            std = centred.pow(2).mean(dim=0).sqrt()
        cov = cov.to(self.running_cov.dtype)
        std = std.to(self.running_std.dtype)
        if self.init_from_first_batch and int(self.num_batches_tracked) == 0:
            self.running_cov.copy_(cov)
            self.running_std.copy_(std)
        else:
            self.running_cov.add_(self.momentum * (cov - self.running_cov))
            self.running_std.add_(self.momentum * (std - self.running_std))
        self.num_batches_tracked.add_(1)

    @torch.no_grad()
    def scale(self) -> Tensor:
        """The per-dimension factor (float32, no gradient) implied by the running statistics."""
        cov = self.running_cov.float()
        std = self.running_std.float()
        outer = std.unsqueeze(1) * std.unsqueeze(0)
        safe = torch.where(outer > 0, outer, torch.ones_like(outer))
        corr = torch.where(outer > 0, cov / safe, torch.zeros_like(cov)).clamp(-1.0, 1.0)
        gamma = corr.pow(2).mean(dim=1)
        scale = (gamma * std + self.eps).pow(-self.beta)
        var = cov.diagonal()
        total = var.sum()
        rescaled = (var * scale.pow(2)).sum()
        return scale * (total / (rescaled + self.eps)).sqrt()

    def has_statistics(self) -> bool:
        """Whether any batch has been seen. Read from the statistics, not from the step
        counter: a teacher made of averaged snapshots gets the float buffers only."""
        return bool(self.running_std.any())

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._update(x)
        elif not self.has_statistics():
            return x
        return x * self.scale().to(x.dtype).unsqueeze(0)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, momentum={self.momentum}, eps={self.eps}, "
                f"beta={self.beta}, init_from_first_batch={self.init_from_first_batch}")


def has_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` keeps running statistics that its training-mode forward updates
    (BatchNorm's ``running_mean``/``running_var``, IsoBN's ``running_cov``/``running_std``)."""
    return any(name.startswith("running_") for name, _ in module.named_buffers(recurse=False))


class BatchNormNoAffine(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` without affine (momentum 0.1, eps 1e-5, PyTorch's defaults).

    A training batch of one example has no batch statistics (PyTorch raises): such a batch, e.g.
    the last one of an epoch, is normalized with the running statistics instead.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var,
                                            training=False, eps=self.eps)
        return super().forward(x)


def make_cls_norm(kind: str, hidden_size: int, stats: ClsStats | None = None) -> nn.Module:
    """Build the [CLS] normalizer ``kind`` (one of :data:`CLS_NORM_KINDS`) of width ``hidden_size``.

    ``center`` and ``standardize`` need ``stats`` (from :func:`compute_cls_stats`); the others
    ignore it.
    """
    if kind not in CLS_NORM_KINDS:
        raise SelftuneError(
            f"unknown [CLS] normalization {kind!r}; valid values: {', '.join(CLS_NORM_KINDS)}"
        )
    if kind == "none":
        return nn.Identity()
    if kind == "batchnorm":
        return BatchNormNoAffine(hidden_size)
    if kind == "layernorm":
        return nn.LayerNorm(hidden_size, elementwise_affine=False)
    if kind == "isobn":
        return IsoBN(hidden_size)
    if stats is None:
        raise SelftuneError(
            f"[CLS] normalization {kind!r} needs the [CLS] statistics (mean/std) of the "
            "pre-trained model on the training set; compute them with compute_cls_stats"
        )
    if stats.hidden_size != hidden_size:
        raise SelftuneError(
            f"[CLS] statistics have {stats.hidden_size} dimensions but the model's hidden size "
            f"is {hidden_size}"
        )
    if kind == "center":
        return CenterNorm(stats.mean)
    return StandardizeNorm(stats.mean, stats.std)


def compute_cls_stats(
    model: nn.Module, dataloader: Iterable[Mapping[str, Tensor]], source: str = "cls"
) -> ClsStats:
    """Per-dimension mean and std of the encoder's [CLS] representation over ``dataloader``.

    ``model`` is a Hugging Face encoder (``BertModel``) or a model with a head, whose
    ``base_model`` is used. Batches are dicts with ``input_ids``, ``attention_mask`` and optionally
    ``token_type_ids``; other keys (``labels``, ...) are ignored. ``source="cls"`` takes the last
    layer's hidden state at position 0, ``source="pooler"`` the pooler output. The model runs in
    eval mode (no dropout) under ``no_grad``; the modules' train/eval modes are restored after.

    The std is the population std (÷N), so standardizing the same data gives exactly unit variance.
    Sums are accumulated in float64 by merging per-batch moments; padding does not enter, since
    position 0 is [CLS] and padded positions are masked out of attention.
    """
    if source not in CLS_SOURCES:
        raise SelftuneError(
            f"unknown [CLS] source {source!r}; valid values: {', '.join(CLS_SOURCES)}"
        )
    encoder = getattr(model, "base_model", model)
    device = next(encoder.parameters()).device
    modes = {module: module.training for module in encoder.modules()}
    encoder.eval()
    moments = _Moments()
    try:
        with torch.no_grad():
            for batch in dataloader:
                if "input_ids" not in batch:
                    raise SelftuneError("a batch for the [CLS] statistics has no 'input_ids'")
                inputs = {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch}
                moments.add(_cls_representation(encoder(**inputs), source).detach().double())
    finally:
        for module, training in modes.items():
            module.training = training
    if moments.mean is None or moments.m2 is None:
        raise SelftuneError("no examples to compute the [CLS] statistics from")
    std = (moments.m2 / moments.count).clamp_min(0).sqrt()
    return ClsStats(mean=moments.mean.float().cpu(), std=std.float().cpu())


def _cls_representation(outputs, source: str) -> Tensor:
    if source == "cls":
        return outputs.last_hidden_state[:, 0]
    rep = getattr(outputs, "pooler_output", None)
    if rep is None:
        raise SelftuneError("the model has no pooler; use the [CLS] source 'cls' instead")
    return rep


class _Moments:
    """Per-dimension count, mean and sum of squared deviations, merged batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, rep: Tensor) -> None:
        n = rep.shape[0]
        if n == 0:
            return
        batch_mean = rep.mean(dim=0)
        batch_m2 = (rep - batch_mean).pow(2).sum(dim=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count = total
