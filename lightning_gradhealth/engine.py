"""The statistics engine: plain torch, no Lightning.

Everything is computed on the gradients' device in foreach kernels (or one small kernel per tensor where
torch has no foreach form), accumulated in float32 or wider whatever the gradient dtype, and packed into ONE
tensor. :meth:`GradStatsEngine.finish` then copies that tensor to the host once and turns it into a
:class:`~lightning_gradhealth.record.StepStats`. Exact NaN/Inf counts cost a full pass over the gradients, so
they are computed only when the global norm (which is free) shows something non-finite; that rare step makes
one more transfer.

No gradient is copied, cast or modified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_gradhealth.distributed import is_dtensor, local, shard_group
from lightning_gradhealth.errors import GradientHealthError
from lightning_gradhealth.layout import ParamLayout
from lightning_gradhealth.record import LayerStats, StepStats

__all__ = ["GradStatsEngine", "NonFiniteTracker", "PendingStats", "StepMeta"]

StatsLevel = Literal["basic", "full"]

# Order of the global scalars at the head of the packed tensor.
_HEAD = ("total_norm", "param_norm", "nonzero", "max_layer_norm", "min_layer_norm", "num_ratio_layers")


def _accum_dtype(device: torch.device) -> torch.dtype:
    # float64 makes combining many per-tensor norms and counting elements exact; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class StepMeta:
    """Where in training a step happened (host values known to the caller, never transferred)."""

    step: int = 0
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    optimizer_idx: int = 0


@dataclass
class PendingStats:
    """Device-side results of one step, waiting for the single transfer.

    Attributes:
        layout: The layout the statistics were computed for.
        present: Indices (into the layout) of the parameters that had a gradient.
        packed: The packed device tensor.
        grads: The gradients the statistics were computed from (references, not copies), kept so that exact
            NaN/Inf counts can be taken if the step turns out non-finite.
        grad_scale: Loss scale still contained in ``grads`` (fused optimizers under a GradScaler), else None.
        extras: Optional device scalars appended at transfer time, by name.
    """

    layout: ParamLayout
    present: tuple[int, ...]
    packed: torch.Tensor
    grads: list[torch.Tensor]
    grad_scale: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class GradStatsEngine:
    """Compute gradient statistics for a :class:`ParamLayout`.

    Args:
        norm_type: Order of the norms (any float ``>= 1`` or ``inf``).
        stats: ``"basic"`` (norms, ratios, zero fraction, non-finite counts) or ``"full"`` (adds max ``|g|``,
            min non-zero ``|g|``, mean and std per layer).
        per_layer: Whether to produce per-layer statistics; ``False`` keeps only the global ones.
        eps: Added to the parameter norm in the grad/param ratio.
    """

    def __init__(
        self,
        norm_type: float = 2.0,
        stats: StatsLevel = "basic",
        per_layer: bool = True,
        eps: float = 1e-8,
    ) -> None:
        self.norm_type = float(norm_type)
        self.full = stats == "full"
        self.per_layer = per_layer
        self.eps = eps
        self._index_cache: dict[tuple[int, tuple[int, ...], torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ device side
    def _combine(self, norms: torch.Tensor, index: torch.Tensor | None, size: int) -> torch.Tensor:
        """Combine per-tensor norms into per-group norms (``index``) or one global norm (``index=None``)."""
        p = self.norm_type
        if math.isinf(p):
            if index is None:
                return norms.amax()
            out = torch.zeros(size, dtype=norms.dtype, device=norms.device)
            return out.scatter_reduce_(0, index, norms, reduce="amax", include_self=False)
        powered = norms.square() if p == 2.0 else norms.pow(p)
        if index is None:
            summed = powered.sum()
        else:
            summed = torch.zeros(size, dtype=norms.dtype, device=norms.device).index_add_(0, index, powered)
        return summed.sqrt() if p == 2.0 else summed.pow(1.0 / p)

    def _layer_index(self, layout: ParamLayout, present: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (id(layout), present, device)
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 64:
                self._index_cache.clear()
            index = torch.tensor([layout.layer_of_param[i] for i in present], dtype=torch.long, device=device)
            self._index_cache[key] = index
        return index

    def norms(self, tensors: Sequence[torch.Tensor], ord: float | None = None) -> torch.Tensor:
        """Per-tensor norms, accumulated in float32 whatever the tensors' dtype, as one device vector.

        Args:
            tensors: Tensors on one device.
            ord: Norm order; defaults to the engine's ``norm_type``.

        Returns:
            A 1-D tensor of per-tensor norms in the accumulation dtype (float64 except on MPS).
        """
        order = self.norm_type if ord is None else ord
        result = torch._foreach_norm(list(tensors), order, dtype=torch.float32)
        return torch.stack(result).to(_accum_dtype(result[0].device))

    def global_norm(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The global norm of ``tensors`` as a device scalar (no host synchronisation).

        Sharded (DTensor) tensors: the local shards' powered sum, reduced with one all-reduce over the sharding
        dimension. Otherwise float32 per-tensor norms combined by one more norm kernel: the value only needs to be
        finite-or-not and good to float32 precision (guard, clipping thresholds, spike z-scores, post-clip norm).
        """
        p = self.norm_type
        if is_dtensor(tensors[0]):
            norms = torch.stack(torch._foreach_norm([local(t) for t in tensors], p, dtype=torch.float32)).double()
            powered = norms.pow(p).sum().reshape(1)
            torch.distributed.all_reduce(powered, group=shard_group(tensors))
            return powered.pow(1.0 / p).reshape(())
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors), p, dtype=torch.float32)), p)

    def compute(
        self,
        layout: ParamLayout,
        grad_scale: torch.Tensor | None = None,
    ) -> PendingStats | None:
        """Launch every reduction of one step on the device; nothing is copied to the host.

        Args:
            layout: The parameters to look at.
            grad_scale: When the gradients still contain a GradScaler's loss scale (fused optimizers under
                ``16-mixed``), the scale tensor; every magnitude is divided by it.

        Returns:
            The pending statistics, or ``None`` when no watched parameter has a gradient.

        Sharded (DTensor) gradients: the statistics of the local shards are reduced with ONE all-reduce over the
        sharding dimension (only finite ``norm_type`` and ``stats="basic"``).

        Raises:
            GradientHealthError: For sharded gradients with ``norm_type=inf`` or ``stats="full"``, or a layout of
                shards that is not supported.
        """
        present = tuple(i for i, p in enumerate(layout.params) if p.grad is not None)
        if not present:
            return None
        grads = [layout.params[i].grad for i in present]
        params = [layout.params[i].detach() for i in present]
        sharded = is_dtensor(grads[0])  # type: ignore[arg-type]
        group = None
        if sharded:
            if math.isinf(self.norm_type) or self.full:
                raise GradientHealthError(
                    "sharded gradients support a finite norm_type and stats='basic' (one sum-reduction)",
                    parameter=layout.param_names[present[0]],
                )
            group = shard_group(grads)  # type: ignore[arg-type]
        local_g = [local(g) for g in grads]  # type: ignore[arg-type]
        local_p = [local(p) for p in params]
        device = local_g[0].device
        n_layers = layout.num_layers
        index = self._layer_index(layout, present, device)

        g_norm = raw_g_norm = self.norms(local_g)
        p_norm = self.norms(local_p)
        acc = g_norm.dtype
        nonzero = torch.stack([torch.count_nonzero(g) for g in local_g]).to(acc)
        inv_scale = None
        if grad_scale is not None:
            inv_scale = grad_scale.detach().to(acc).reshape(()).reciprocal()
            g_norm = g_norm * inv_scale

        if sharded:
            # per-layer powered sums of the local shards, summed over the shards in one collective
            p = self.norm_type
            zeros = torch.zeros(3 * n_layers, dtype=acc, device=device)
            sums = torch.cat([g_norm.pow(p), p_norm.pow(p), nonzero])
            offsets = torch.cat([index, index + n_layers, index + 2 * n_layers])
            reduced = zeros.index_add_(0, offsets, sums)
            torch.distributed.all_reduce(reduced, group=group)
            layer_pw_g, layer_pw_p, layer_nz_global = reduced.split(n_layers)
            layer_g, layer_p = layer_pw_g.pow(1.0 / p), layer_pw_p.pow(1.0 / p)
            total, p_total = layer_pw_g.sum().pow(1.0 / p), layer_pw_p.sum().pow(1.0 / p)
            nonzero_total = layer_nz_global.sum()
        else:
            total = self._combine(g_norm, None, 1)
            layer_g = self._combine(g_norm, index, n_layers)
            layer_p = self._combine(p_norm, index, n_layers)
            p_total = self._combine(p_norm, None, 1)
            nonzero_total = nonzero.sum()
            layer_nz_global = None
        usable = torch.isfinite(layer_g) & (layer_g > 0)
        inf = torch.tensor(math.inf, dtype=acc, device=device)
        head = torch.stack(
            [
                total,
                p_total,
                nonzero_total,
                torch.where(usable, layer_g, -inf).amax(),
                torch.where(usable, layer_g, inf).amin(),
                usable.sum().to(acc),
            ]
        )
        parts = [head]
        if self.per_layer:
            layer_nz = (
                layer_nz_global
                if layer_nz_global is not None
                else torch.zeros(n_layers, dtype=acc, device=device).index_add_(0, index, nonzero)
            )
            parts += [layer_g, layer_p, layer_nz]
        if self.full:
            l2 = raw_g_norm if self.norm_type == 2.0 else None  # reuse the L2 norms already taken
            parts += self._full_stats(grads, index, n_layers, acc, inv_scale, l2)  # type: ignore[arg-type]
        return PendingStats(
            layout=layout,
            present=present,
            packed=torch.cat(parts),
            grads=grads,  # type: ignore[arg-type]
            grad_scale=grad_scale,
        )

    def _full_stats(
        self,
        grads: list[torch.Tensor],
        index: torch.Tensor,
        n_layers: int,
        acc: torch.dtype,
        inv_scale: torch.Tensor | None,
        l2_norms: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        device = index.device
        max_l, min_nz_l, sums = [], [], []
        for g in grads:
            # one |g| temporary per tensor, reused in place: max, then min over the non-zero entries
            absg = g.abs()
            max_l.append(absg.amax())
            min_nz_l.append(absg.masked_fill_(absg == 0, math.inf).amin())
            sums.append(g.sum(dtype=torch.float32))  # float32 cascade sum; combined across tensors in `acc`
        max_abs = torch.stack(max_l).to(acc)
        min_abs = torch.stack(min_nz_l).to(acc)
        sums_t = torch.stack(sums).to(acc)
        sq = (l2_norms if l2_norms is not None else self.norms(grads, 2.0)).square()
        if inv_scale is not None:
            max_abs, min_abs, sums_t, sq = (
                max_abs * inv_scale,
                min_abs * inv_scale,
                sums_t * inv_scale,
                sq * (inv_scale * inv_scale),
            )
        layer_max = torch.zeros(n_layers, dtype=acc, device=device).scatter_reduce_(
            0, index, max_abs, reduce="amax", include_self=False
        )
        layer_min = torch.zeros(n_layers, dtype=acc, device=device).scatter_reduce_(
            0, index, min_abs, reduce="amin", include_self=False
        )
        layer_sum = torch.zeros(n_layers, dtype=acc, device=device).index_add_(0, index, sums_t)
        layer_sq = torch.zeros(n_layers, dtype=acc, device=device).index_add_(0, index, sq)
        return [layer_max, layer_min, layer_sum, layer_sq]

    def guard(self, layout: ParamLayout, grad_scale: torch.Tensor | None = None) -> PendingStats | None:
        """The cheapest useful check of a step: the global gradient norm alone (one foreach kernel).

        Its finiteness catches any NaN/Inf in any gradient; :meth:`read_guard` copies it (and the extras) to the
        host in one transfer.

        Args:
            layout: The parameters to look at.
            grad_scale: Loss scale still contained in the gradients, divided out of the norm.

        Returns:
            The pending guard, or ``None`` when no watched parameter has a gradient.
        """
        grads: list[torch.Tensor] = [g for p in layout.params if (g := p.grad) is not None]  # one pass
        if not grads:
            return None
        total = self.global_norm(grads)
        if grad_scale is not None:
            total = total / grad_scale.detach().float().reshape(())
        # `present` stays empty: a guard never becomes a record (a failing step recomputes everything)
        return PendingStats(layout=layout, present=(), packed=total.reshape(1), grads=grads, grad_scale=grad_scale)

    def histograms(
        self, layout: ParamLayout, bins: int = 64, grad_scale: torch.Tensor | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per-layer histograms of the gradient entries, computed on the device, copied in one transfer.

        Bucket edges span each layer's [min, max] evenly; no gradient is copied to the host.

        Args:
            layout: The parameters.
            bins: Buckets per layer.
            grad_scale: Loss scale still contained in the gradients (divided out of every value).

        Returns:
            ``{layer: {"min", "max", "num", "sum", "sum_squares", "bucket_limits", "bucket_counts"}}`` for the layers
            with a gradient, ready for ``SummaryWriter.add_histogram_raw``.
        """
        present = [i for i, p in enumerate(layout.params) if p.grad is not None]
        if not present:
            return {}
        device = layout.params[present[0]].grad.device  # type: ignore[union-attr]
        acc = _accum_dtype(device)
        by_layer: dict[int, list[torch.Tensor]] = {}
        for i in present:
            by_layer.setdefault(layout.layer_of_param[i], []).append(layout.params[i].grad.detach().reshape(-1))  # type: ignore[union-attr]
        rows, order = [], []
        steps = torch.arange(bins + 1, device=device, dtype=acc) / bins
        for j, flats in sorted(by_layer.items()):
            lo = torch.stack([f.min() for f in flats]).min().to(acc)
            hi = torch.stack([f.max() for f in flats]).max().to(acc)
            edges = lo + (hi - lo) * steps
            counts = torch.zeros(bins, dtype=acc, device=device)
            total = torch.zeros((), dtype=acc, device=device)
            sq = torch.zeros((), dtype=acc, device=device)
            for f in flats:
                idx = torch.bucketize(f, edges[1:-1].to(f.dtype), right=True)
                counts += torch.bincount(idx, minlength=bins).to(acc)
                total += f.sum(dtype=acc)
                sq += torch.linalg.vector_norm(f, dtype=acc).square()
            num = torch.tensor(float(sum(f.numel() for f in flats)), dtype=acc, device=device)
            rows.append(torch.cat([torch.stack([lo, hi, num, total, sq]), edges[1:], counts]))
            order.append(j)
        values = torch.stack(rows)
        if grad_scale is not None:
            inv = grad_scale.detach().to(acc).reshape(()).reciprocal()
            scale = torch.ones(values.shape[1], dtype=acc, device=device)
            scale[[0, 1, 3]] = inv
            scale[4] = inv * inv
            scale[5 : 5 + bins] = inv
            values = values * scale
        host = values.tolist()  # one transfer for every layer
        out = {}
        for j, row in zip(order, host, strict=True):
            out[layout.layer_names[j]] = {
                "min": row[0], "max": row[1], "num": row[2], "sum": row[3], "sum_squares": row[4],
                "bucket_limits": row[5 : 5 + bins], "bucket_counts": row[5 + bins :],
            }  # fmt: skip
        return out

    @staticmethod
    def _transfer(pending: PendingStats) -> tuple[list[float], dict[str, float]]:
        """The one device-to-host copy: the packed tensor with the extras appended."""
        names = list(pending.extras)
        packed = pending.packed
        if names:
            extra = torch.stack([pending.extras[k].detach().to(packed.dtype).reshape(()) for k in names])
            packed = torch.cat([packed, extra])
        values: list[float] = packed.tolist()
        if not names:
            return values, {}
        return values[: -len(names)], dict(zip(names, values[-len(names) :], strict=True))

    def read_guard(self, pending: PendingStats) -> tuple[float, dict[str, float]]:
        """Copy a guard's global norm and extras to the host (one transfer). Returns ``(total_norm, extras)``."""
        values, extras = self._transfer(pending)
        return values[0], extras

    def nonfinite_counts(self, pending: PendingStats) -> torch.Tensor:
        """Exact per-layer NaN and Inf counts, packed ``[nan_0..nan_L, inf_0..inf_L]`` (device tensor)."""
        layout = pending.layout
        device = pending.packed.device
        acc = pending.packed.dtype
        index = self._layer_index(layout, pending.present, device)
        local_g = [local(g) for g in pending.grads]
        nan = torch.stack([torch.isnan(g).sum() for g in local_g]).to(acc)
        inf = torch.stack([torch.isinf(g).sum() for g in local_g]).to(acc)
        zeros = torch.zeros(layout.num_layers, dtype=acc, device=device)
        counts = torch.cat([zeros.index_add(0, index, nan), zeros.index_add(0, index, inf)])
        if is_dtensor(pending.grads[0]):
            torch.distributed.all_reduce(counts, group=shard_group(pending.grads))
        return counts

    # ------------------------------------------------------------------ host side
    def finish(self, pending: PendingStats, meta: StepMeta) -> StepStats:
        """Copy the packed tensor to the host (one transfer) and build the record.

        A step whose global norm is non-finite makes one more transfer, for the exact NaN/Inf counts.

        Args:
            pending: What :meth:`compute` returned, plus any extras added since.
            meta: Step, epoch, batch and optimizer indices.

        Returns:
            The typed record.
        """
        values, extras = self._transfer(pending)  # the one device -> host transfer of the step
        head = dict(zip(_HEAD, values[: len(_HEAD)], strict=True))
        pos = len(_HEAD)
        layout = pending.layout
        n = layout.num_layers
        present_numel = [0] * n
        for i in pending.present:
            present_numel[layout.layer_of_param[i]] += layout.params[i].numel()
        total_numel = sum(present_numel)

        nan_l = [0] * n
        inf_l = [0] * n
        total = head["total_norm"]
        if not math.isfinite(total):
            counts = [int(c) for c in self.nonfinite_counts(pending).tolist()]  # rare second transfer
            nan_l, inf_l = counts[:n], counts[n:]

        layers: list[LayerStats] = []
        if self.per_layer:
            g, p, nz = (values[pos + k * n : pos + (k + 1) * n] for k in range(3))
            pos += 3 * n
            full: list[list[float]] = []
            if self.full:
                full = [values[pos + k * n : pos + (k + 1) * n] for k in range(4)]
                pos += 4 * n
            for j in range(n):
                if present_numel[j] == 0:
                    continue
                numel = present_numel[j]
                kwargs: dict[str, float | None] = {}
                if full:
                    mean = full[2][j] / numel
                    var = max(full[3][j] / numel - mean * mean, 0.0)
                    kwargs = {"max_abs": full[0][j], "min_abs_nonzero": full[1][j], "mean": mean, "std": math.sqrt(var)}
                layers.append(
                    LayerStats(
                        name=layout.layer_names[j],
                        numel=numel,
                        grad_norm=g[j],
                        param_norm=p[j],
                        ratio=g[j] / (p[j] + self.eps),
                        zero_frac=(numel - nz[j]) / numel,
                        nan_count=nan_l[j],
                        inf_count=inf_l[j],
                        **kwargs,  # type: ignore[arg-type]
                    )
                )
        n_ratio = int(head["num_ratio_layers"])
        if not math.isfinite(total):
            layer_norm_ratio = math.nan  # not a healthy 1.0: the layers cannot be compared on a non-finite step
        else:
            layer_norm_ratio = head["max_layer_norm"] / head["min_layer_norm"] if n_ratio >= 2 else 1.0
        present = set(pending.present)
        no_grad = tuple(name for i, name in enumerate(layout.param_names) if i not in present)
        grad_scale = extras.get("amp_scale")
        micro = extras.get("first_nonfinite_micro_batch")
        if micro is None and not math.isfinite(total):
            micro = 0  # no micro-batch tracking (a single micro-batch): it is the one that went non-finite
        return StepStats(
            step=meta.step,
            global_step=meta.global_step,
            epoch=meta.epoch,
            batch_idx=meta.batch_idx,
            optimizer_idx=meta.optimizer_idx,
            total_norm=total,
            param_norm=head["param_norm"],
            zero_frac=(total_numel - head["nonzero"]) / total_numel,
            nan_count=sum(nan_l),
            inf_count=sum(inf_l),
            layer_norm_ratio=layer_norm_ratio,
            no_grad_count=len(no_grad),
            no_grad_params=no_grad,
            layers=tuple(layers),
            amp_scale=grad_scale,
            amp_overflow=grad_scale is not None and not math.isfinite(total),
            first_nonfinite_micro_batch=None if micro is None or micro < 0 else int(micro),
            grad_max_abs=max((lay.max_abs for lay in layers if lay.max_abs is not None), default=None),
        )


class NonFiniteTracker:
    """Remember, on the device, the first micro-batch after which the accumulated gradient went non-finite.

    Accumulated gradients are running sums, so once non-finite they stay non-finite: the first micro-batch
    whose running gradient is non-finite is the one that introduced the NaN/Inf. Each observation is one
    foreach norm and a few scalar kernels, with no host synchronisation.
    """

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None
        self.micro_batches = 0

    def reset(self) -> None:
        """Forget the current optimizer step."""
        self.first_bad = None
        self.micro_batches = 0

    def observe(self, params: Sequence[torch.Tensor]) -> None:
        """Look at the running gradients after one more backward pass."""
        grads = [p.grad for p in params if p.grad is not None]
        idx = self.micro_batches
        self.micro_batches += 1
        if not grads or is_dtensor(grads[0]):
            return  # sharded: the final global norm decides; micro-batches are not tracked per shard
        norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32))
        bad = ~torch.isfinite(norms).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=norms.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), idx, self.first_bad)
