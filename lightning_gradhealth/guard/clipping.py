"""Gradient clippers, applied by the monitor after the statistics of a step are taken.

Every clipper works on the *true* (unscaled) gradient: when the gradients still contain a GradScaler's loss
scale (a fused optimizer under ``16-mixed``), thresholds are multiplied by the scale instead of touching the
gradients twice. Adaptive clippers never let a non-finite norm into their running state (a single NaN step
would otherwise poison an EMA or a percentile history for the rest of the run).

Sharded gradients (FSDP2, FSDP1, tensor parallelism, HSDP, on any device mesh) are clipped shard by shard with
the same global numbers as an unsharded run: norm-based clippers scale every local shard by the coefficient of the
global norm; value clipping is element-wise; AGC sums the partial norms of units cut across ranks (one all-reduce
per mesh dimension that cuts some unit: :mod:`~lightning_gradhealth.model.shards`). Value and AGC sum their
post-clip norm and "clipped" flag over the shards, copies counted once (one more scalar-pair all-reduce, and one
over the pipeline stages).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_gradhealth.model.distributed import sum_over
from lightning_gradhealth.model.shards import Shards, sum_cut_units
from lightning_gradhealth.schema.errors import UnsupportedSetupError
from lightning_gradhealth.stats.kernels import foreach_norm_f32_or_wider

if TYPE_CHECKING:
    from lightning_gradhealth.config.options import HealthOptions

__all__ = [
    "AGCClipper",
    "AutoClipper",
    "ClipOutcome",
    "Clipper",
    "NormClipper",
    "ValueClipper",
    "ZClipper",
    "make_clipper",
    "percentile",
]

_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


@dataclass(frozen=True)
class ClipOutcome:
    """What a clipper did at one step.

    Attributes:
        clipped: Whether any gradient was changed, when known on the host; ``None`` when it is only known on the
            device (``clipped_device``), for clippers that decide per entry or per unit (value, AGC).
        coef: The global scaling coefficient (``<= 1``) for norm-based clippers, else ``None``.
        threshold: The norm the gradient was clipped to (norm-based clippers), else ``None``.
        clipped_norm: Global norm after clipping, when known without another pass over the gradients.
        clipped_norm_device: Global norm after clipping as a device scalar, when it needs a pass (value, AGC).
    """

    clipped: bool | None
    coef: float | None = None
    threshold: float | None = None
    clipped_norm: float | None = None
    clipped_norm_device: torch.Tensor | None = None
    clipped_device: torch.Tensor | None = None


class Clipper:
    """Base class: ``clip(grads, params, total_norm, scale, shards)`` modifies ``grads`` in place."""

    name = "none"

    def clip(
        self,
        grads: Sequence[torch.Tensor],
        params: Sequence[torch.Tensor],
        total_norm: float,
        scale: torch.Tensor | None = None,
        shards: Shards | None = None,
    ) -> ClipOutcome:
        """Clip ``grads`` in place.

        Args:
            grads: The gradients (possibly still multiplied by ``scale``); for sharded gradients, the local shards.
            params: The parameters (local shards), aligned with ``grads``.
            total_norm: The true global L2 norm of the gradients (unscaled, over every shard), finite.
            scale: The loss scale still contained in ``grads``, if any.
            shards: How ``grads`` are split across ranks; ``None`` when they are whole.

        Returns:
            What was done.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Running state (none for stateless clippers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def reset(self) -> None:
        """Forget the running state, as a new clipper (the norms seen so far were of other parameters)."""
        self.load_state_dict({})

    @staticmethod
    def _scale_by(grads: Sequence[torch.Tensor], total_norm: float, threshold: float) -> ClipOutcome:
        coef = threshold / (total_norm + _EPS)
        if coef >= 1.0:
            return ClipOutcome(clipped=False, coef=1.0, threshold=threshold, clipped_norm=total_norm)
        torch._foreach_mul_(list(grads), coef)
        return ClipOutcome(clipped=True, coef=coef, threshold=threshold, clipped_norm=total_norm * coef)


class NormClipper(Clipper):
    """Scale the gradient to a global L2 norm of at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``)."""

    name = "norm"

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def clip(self, grads, params, total_norm, scale=None, shards=None):  # noqa: D102, ANN001, ANN201
        return self._scale_by(grads, total_norm, self.max_norm)


class ValueClipper(Clipper):
    """Clamp every gradient entry to ``[-clip_value, clip_value]`` (``torch.nn.utils.clip_grad_value_``)."""

    name = "value"

    def __init__(self, clip_value: float) -> None:
        self.clip_value = clip_value

    def clip(self, grads, params, total_norm, scale=None, shards=None):  # noqa: D102, ANN001, ANN201
        grads = list(grads)
        bound = self.clip_value if scale is None else float(self.clip_value) * scale.detach().float().reshape(())
        # whether any entry is out of bounds, before clamping (aminmax: one vectorised pass per tensor)
        whole = [g for g in grads if g.numel()]  # an empty local shard has no extremes
        if whole:
            extremes = torch.stack([torch.stack(torch.aminmax(g)).float() for g in whole])
            clipped = ((extremes[:, 1] > bound) | (extremes[:, 0] < -bound)).any()
        else:
            clipped = torch.zeros((), dtype=torch.bool, device=grads[0].device)
        if isinstance(bound, torch.Tensor):
            for g in grads:
                torch.clamp_(g, min=-bound.to(g.dtype), max=bound.to(g.dtype))
        else:
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        norms = torch.stack([n.double() for n in foreach_norm_f32_or_wider(grads, 2.0)])
        if shards is not None and shards.counted is not None:  # copies of a tensor count once
            norms = norms * torch.tensor(shards.counted, dtype=norms.dtype).to(norms.device)
        post_sq, clipped = _sum_shards(norms.square().sum(), clipped, shards)
        post = post_sq.sqrt()
        if scale is not None:
            post = post / scale.detach().double().reshape(())
        return ClipOutcome(clipped=None, clipped_norm_device=post, clipped_device=clipped)


def _sum_shards(
    post_sq: torch.Tensor, clipped: torch.Tensor, shards: Shards | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-clip squared norm and "any entry clipped" over every shard and every pipeline stage.

    One all-reduce of the pair over the shards' group, and one over the pipeline stages' group when there is one.
    """
    if shards is None:
        return post_sq, clipped
    both = torch.stack([post_sq.double(), clipped.double()])
    for group in (shards.group, shards.stage_group):
        if group is not None:
            sum_over(both, group)
    return both[0], both[1] > 0


class AGCClipper(Clipper):
    """Adaptive gradient clipping (Brock et al., NFNets; timm's ``adaptive_clip_grad``), unit-wise.

    A unit is a slice along dimension 0 (an output unit of a Linear or Conv weight); 0-/1-D tensors are one
    unit. Each unit's gradient is rescaled to at most ``clip_factor * max(||w_unit||, eps)``. Sharded units (rows
    cut by tensor parallelism, 1-D tensors split by FSDP) are summed across the ranks that hold their pieces first.
    """

    name = "agc"

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        self.clip_factor = clip_factor
        self.eps = eps

    @staticmethod
    def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
        """L2 norm per unit (dimension 0), keeping dims for broadcasting; the whole tensor for ndim <= 1."""
        return AGCClipper._unit_sq(x).sqrt()

    @staticmethod
    def _unit_sq(x: torch.Tensor) -> torch.Tensor:
        # squared in float64 (float32 on MPS, which has no float64): a float32 square overflows above ~1.8e19
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if x.ndim <= 1:
            return torch.linalg.vector_norm(x, dtype=acc).to(wide).square()
        dims = tuple(range(1, x.ndim))
        return torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=acc).to(wide).square()

    def clip(self, grads, params, total_norm, scale=None, shards=None):  # noqa: D102, ANN001, ANN201
        grads, params = list(grads), list(params)
        if shards is not None and shards.refusal is not None:
            raise UnsupportedSetupError(shards.refusal)
        factor = self.clip_factor if scale is None else self.clip_factor * scale.detach().float().reshape(())
        p_sq = [self._unit_sq(p.detach()) for p in params]
        g_sq = [self._unit_sq(g) for g in grads]
        g_sq_here = list(g_sq)  # this rank's part of each unit, for the post-clip norm
        if shards is not None and shards.unit_groups:  # units cut across ranks: their parts summed, per cutting group
            sum_cut_units((p_sq, g_sq), shards)
        post, any_clipped = [], []
        for g, p2, g2, here in zip(grads, p_sq, g_sq, g_sq_here, strict=True):
            max_norm = p2.sqrt().clamp(min=self.eps) * factor
            g_norm = g2.sqrt()
            coef = torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=_EPS), torch.ones_like(g_norm))
            g.mul_(coef.to(g.dtype))
            post.append((here.double() * coef.clamp(max=1.0).double().square()).sum())
            any_clipped.append((coef < 1).any())
        posts = torch.stack(post)
        if shards is not None and shards.counted is not None:  # copies of a tensor count once
            posts = posts * torch.tensor(shards.counted, dtype=posts.dtype).to(posts.device)
        post_sq, clipped = _sum_shards(posts.sum(), torch.stack(any_clipped).any(), shards)
        out = post_sq.sqrt()
        if scale is not None:
            out = out / scale.detach().double().reshape(())
        return ClipOutcome(clipped=None, clipped_norm_device=out, clipped_device=clipped)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as ``numpy.percentile``'s default."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class AutoClipper(Clipper):
    """AutoClip (Seetharaman et al., 2020): clip to the ``percentile``-th percentile of the norms seen so far.

    The current norm joins the history before the percentile is taken, as in the paper's code. The history is
    bounded (the most recent ``history`` norms) and only finite norms enter it.
    """

    name = "autoclip"

    def __init__(self, percentile: float = 10.0, history: int = 10_000) -> None:
        self.percentile = percentile
        self.history: deque[float] = deque(maxlen=history)

    def clip(self, grads, params, total_norm, scale=None, shards=None):  # noqa: D102, ANN001, ANN201
        if not math.isfinite(total_norm):
            return ClipOutcome(clipped=False)  # (as ZClip: a non-finite gradient is the guard's business)
        self.history.append(total_norm)
        return self._scale_by(grads, total_norm, percentile(self.history, self.percentile))

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"history": list(self.history), "maxlen": self.history.maxlen}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.history = deque(state.get("history", ()), maxlen=state.get("maxlen", self.history.maxlen))


class ZClipper(Clipper):
    """ZClip (Kumar et al., 2025): z-score clipping against an EMA of the gradient norm's mean and variance.

    For ``warmup_steps`` steps the norms are collected (no clipping); their mean and variance start the EMA.
    Then, with ``z = (norm - mean) / (std + eps)``, a norm with ``z > z_thresh`` is clipped to
    ``mean + z_thresh * std / (z / z_thresh)`` (the "adaptive scaling" rule: larger outliers are clipped harder).
    The EMA is updated with the clipped norm (or the norm itself when not clipped), with ``alpha`` as
    ``mean = alpha * mean + (1 - alpha) * x`` and ``var = alpha * var + (1 - alpha) * (x - mean)^2``. Non-finite
    norms never enter the statistics.
    """

    name = "zclip"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6) -> None:
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = warmup_steps
        self.eps = eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def threshold(self, total_norm: float) -> float | None:
        """The clip threshold for ``total_norm`` given the current statistics (``None``: no clipping)."""
        if self.mean is None or self.var is None:
            return None
        std = math.sqrt(self.var)
        z = (total_norm - self.mean) / (std + self.eps)
        if z <= self.z_thresh:
            return None
        return self.mean + self.z_thresh * std / (z / self.z_thresh)

    def clip(self, grads, params, total_norm, scale=None, shards=None):  # noqa: D102, ANN001, ANN201
        if not math.isfinite(total_norm):
            return ClipOutcome(clipped=False)
        if self.mean is None:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.buffer = []
            return ClipOutcome(clipped=False, coef=1.0, clipped_norm=total_norm)
        thr = self.threshold(total_norm)
        outcome = (
            self._scale_by(grads, total_norm, thr)
            if thr is not None
            else ClipOutcome(clipped=False, coef=1.0, clipped_norm=total_norm)
        )
        x = thr if thr is not None else total_norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2  # type: ignore[operator]
        return outcome

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"buffer": list(self.buffer), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.buffer = list(state.get("buffer", ()))
        self.mean = state.get("mean")
        self.var = state.get("var")


_BUILDERS: dict[str, Callable[[dict[str, Any]], Clipper]] = {
    "norm": lambda a: NormClipper(a["max_norm"]),
    "value": lambda a: ValueClipper(a["clip_value"]),
    "agc": lambda a: AGCClipper(a["agc_clip_factor"], a["agc_eps"]),
    "autoclip": lambda a: AutoClipper(a["autoclip_percentile"], a["autoclip_history"]),
    "zclip": lambda a: ZClipper(a["zclip_alpha"], a["zclip_z_thresh"], a["zclip_warmup_steps"]),
}


def make_clipper(options: HealthOptions) -> Clipper | None:
    """A new clipper for ``options.clip`` with its parameters (defaults filled in), or ``None``."""
    return None if options.clip is None else _BUILDERS[options.clip](options.clip_args())
