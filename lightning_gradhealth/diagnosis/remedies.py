"""The default remedies of each problem kind, from the literature cited in ``docs/diagnosis.md``.

What to recommend (:data:`FIXES`) and what code to add (:data:`CODE`) when nothing is known about the model;
:mod:`~lightning_gradhealth.diagnosis.fixes` fits them to a model's inventory. A new finding kind adds its entries
here.
"""

from __future__ import annotations

from lightning_gradhealth.schema.kinds import Kind

__all__ = ["CODE", "FIXES"]

#: kind (:class:`~lightning_gradhealth.schema.kinds.Kind`) -> fixes, most useful first (sources:
#: ``docs/diagnosis.md``), when
#: nothing is known about the model. Every kind has its own entry.
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
    Kind.RISING_TREND: (
        "clip gradients: GradientHealthMonitor(clip='norm', max_norm=1.0) before the norms reach the exploding lines",
        "lower the learning rate or decay it (cosine or step schedule)",
        "add weight decay: growing weights make growing gradients",
    ),
    Kind.DECAYING_TREND: (
        "check the learning-rate schedule: norms that decay with the loss are fine while the loss still falls",
        "if the loss stalls, treat it as vanishing gradients: fitting activations, initialisation, normalisation",
    ),
    Kind.NO_GRADIENT: (
        "check that every parameter reaches the loss: unused heads or branches, outputs dropped before the loss, "
        ".detach() or torch.no_grad() inside forward",
        "freeze what you do not train: p.requires_grad_(False), or leave it out with exclude=",
        "under DDP, remove unused parameters or set find_unused_parameters=True",
    ),
    Kind.DIVERGING: (
        "lower the learning rate (3-10x) or lengthen the warm-up: the loss rises with the gradient norm",
        "clip gradients: GradientHealthMonitor(clip='norm', max_norm=1.0) or Trainer(gradient_clip_val=1.0)",
        "check the data and the loss: a bad batch, label noise, wrong targets, a loss unbounded below",
    ),
    # ---- recurrence (issue 19): Bengio et al. 1994; Pascanu et al. 2013; Hochreiter & Schmidhuber 1997
    Kind.RECURRENT_VANISHING: (
        "use gated cells: nn.LSTM or nn.GRU instead of nn.RNN (their additive state carries the gradient through "
        "time)",
        "shorten the path through time: truncated BPTT over shorter windows, attention over the states, or a "
        "prediction from every step instead of the last only",
        "initialise the recurrent weights orthogonally: nn.init.orthogonal_(rnn.weight_hh_l0) (spectral radius 1)",
    ),
    Kind.RECURRENT_EXPLODING: (
        "clip gradients: GradientHealthMonitor(clip='norm', max_norm=5.0), the usual bound for RNNs "
        "(Pascanu et al. 2013)",
        "truncated BPTT over shorter windows: fewer recurrent Jacobians multiply into the gradient",
        "initialise the recurrent weights orthogonally: nn.init.orthogonal_(rnn.weight_hh_l0), not larger; prefer "
        "tanh or gated cells (nn.LSTM/nn.GRU) to a ReLU recurrence",
        "lower the learning rate",
    ),
    Kind.STALL: (
        "check the learning-rate schedule: print optimizer.param_groups[i]['lr'] at a few steps; a scheduler stepped "
        "per batch with an epoch-based length (or the reverse) reaches 0 early",
        "check what is frozen: [n for n, p in model.named_parameters() if not p.requires_grad]",
        "a loss at chance level: check that the labels match the inputs (shuffled together, the right column) and "
        "that gradients reach the early layers",
    ),
}

#: kind -> code to add, when nothing is known about the model.
CODE: dict[str, str] = {
    Kind.NONFINITE: "GradientHealthMonitor(clip='norm', max_norm=1.0)\n"
    "loss = F.cross_entropy(logits, targets, label_smoothing=0.1)",
    Kind.EXPLODING: "GradientHealthMonitor(clip='norm', max_norm=1.0)  # or Trainer(gradient_clip_val=1.0)",
    Kind.VANISHING: "def init_weights(m):\n    if isinstance(m, nn.Linear):\n"
    "        nn.init.kaiming_normal_(m.weight, nonlinearity='relu')\n\nmodel.apply(init_weights)",
    Kind.DEAD: "nn.LeakyReLU(negative_slope=0.01)  # instead of nn.ReLU()",
    Kind.SATURATION: "nn.GELU()  # instead of nn.Sigmoid() / nn.Tanh() inside the network",
    Kind.LAYER_IMBALANCE: "x = x + block(norm(x))  # residual connection around a normalised block",
    Kind.SPIKE: "GradientHealthMonitor(clip='zclip', on_spike='skip', spike_dir='spikes/')",
    Kind.RISING_TREND: "GradientHealthMonitor(clip='norm', max_norm=1.0)",
    Kind.DECAYING_TREND: "# check the learning rate schedule and the architecture (see vanishing)",
    Kind.RATIO_HIGH: "# lower the learning rate of the optimizer",
    Kind.RATIO_LOW: "# raise the learning rate, or check that these layers are not frozen by mistake",
    Kind.NO_GRADIENT: "for name, p in model.named_parameters():\n    if p.grad is None:\n"
    "        print('no gradient:', name)",
    Kind.DIVERGING: "optimizer = torch.optim.AdamW(model.parameters(), lr=lr / 10)  # and a warm-up",
    Kind.RECURRENT_VANISHING: "rnn = nn.LSTM(input_size, hidden_size, batch_first=True)  # instead of nn.RNN",
    Kind.RECURRENT_EXPLODING: "GradientHealthMonitor(clip='norm', max_norm=5.0)",
    Kind.STALL: "for name, p in model.named_parameters():\n    if not p.requires_grad:\n"
    "        print('frozen:', name)\nprint([group['lr'] for group in optimizer.param_groups])",
}
