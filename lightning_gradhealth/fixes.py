"""Recommended fixes by problem kind, as the seeds (the project's reference notes, 000-003) give them."""

from __future__ import annotations

from lightning_gradhealth.kinds import Kind

__all__ = ["FIXES"]

#: kind (:class:`~lightning_gradhealth.kinds.Kind`) -> fixes, most useful first (sources: seeds 000-003). The
#: trends and the missing gradients borrow the fixes of the problem they lead to (see ``rules.diagnose``).
FIXES: dict[str, tuple[str, ...]] = {
    Kind.NONFINITE: (
        "lower the learning rate",
        "clip gradients: GradientHealthMonitor(clip='norm', max_norm=1.0) or Trainer(gradient_clip_val=1.0)",
        "make the loss numerically stable: F.cross_entropy(logits, y, label_smoothing=0.1), log(x + 1e-8) instead "
        "of log(x); under fp16 prefer precision='bf16-mixed'",
    ),
    Kind.EXPLODING: (
        "clip gradients: max_norm=1.0 for transformers, 5.0 for RNNs",
        "reduce the learning rate or add warm-up",
        "check the initialisation: weights too large make gradients grow with depth",
    ),
    Kind.VANISHING: (
        "use ReLU/GELU instead of sigmoid/tanh in deep stacks",
        "add residual connections and normalisation",
        "use a fitting initialisation: nn.init.kaiming_normal_ for ReLU, xavier_uniform_ for tanh",
    ),
    Kind.DEAD: (
        "use LeakyReLU or GELU instead of ReLU",
        "lower the learning rate; check the initialisation (He init for ReLU)",
    ),
    Kind.SATURATION: (
        "switch saturating sigmoid/tanh layers to ReLU/GELU",
        "normalise their inputs (LayerNorm/BatchNorm) and use Xavier initialisation",
    ),
    Kind.RATIO_HIGH: ("reduce the learning rate: the updates are large relative to the weights",),
    Kind.RATIO_LOW: ("increase the learning rate or fix the architecture",),
    Kind.LAYER_IMBALANCE: (
        "gradient norms differ by orders of magnitude across layers: add normalisation or residual connections, or "
        "use per-layer learning rates",
    ),
    Kind.SPIKE: ("clip gradients (clip='norm' or clip='zclip') and check the data of the offending batch",),
}
