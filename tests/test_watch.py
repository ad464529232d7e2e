"""WatchedSet on a plain nn.Module and plain optimizers, no Trainer: what is watched, and what changed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.model.watch import WatchChange, WatchedSet
from lightning_gradhealth.schema.errors import GradientHealthError, UnsupportedSetupError

BACKBONE = ("backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias")
HEAD = ("head.weight", "head.bias")
ALL = BACKBONE + HEAD


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).relu())


def _sgd(params: Iterable[Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def _started(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], **options: Any) -> WatchedSet:
    watched = WatchedSet(HealthOptions(**options))
    watched.start(model, optimizers)
    return watched


def _named(model: nn.Module, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    params = dict(model.named_parameters())
    return tuple(params[n] for n in names)


# ---------------------------------------------------------------------------------------------------- start


def test_layout_names_layers_and_sizes():
    model = Net()
    opt = _sgd(model.parameters())
    watched = _started(model, [opt])
    assert watched.model is model and watched.waiting == () and watched.sparse_layers == frozenset()
    layout, change = watched.layout_for(opt, [opt])
    assert change is None  # the first layout is the start, not a change
    assert layout.param_names == ALL
    assert all(a is b for a, b in zip(layout.params, _named(model, ALL), strict=True))
    assert layout.layer_names == ("backbone.0", "backbone.2", "head")
    assert layout.layer_of_param == (0, 0, 1, 1, 2, 2)
    assert layout.layer_numel == (4 * 8 + 8, 8 * 8 + 8, 8 * 2 + 2)
    assert watched.names == ALL and watched.state_dict() == list(ALL)
    assert watched.model_layout.param_names == ALL
    again, change = watched.layout_for(opt, [opt])
    assert again is layout and change is None  # nothing changed: the same layout, not rebuilt


def test_group_by_parameter_makes_every_parameter_a_layer():
    model = Net()
    opt = _sgd(model.parameters())
    layout, _ = _started(model, [opt], group_by="parameter").layout_for(opt, [opt])
    assert layout.layer_names == ALL
    assert layout.layer_numel == tuple(p.numel() for p in _named(model, ALL))


def test_each_optimizer_watches_its_own_parameters():
    model = Net()
    body, head = _sgd(model.backbone.parameters()), _sgd(model.head.parameters())
    watched = _started(model, [body, head])
    assert watched.layout_for(body, [body, head])[0].param_names == BACKBONE
    assert watched.layout_for(head, [body, head])[0].param_names == HEAD
    assert set(watched.names) == set(ALL)


# ---------------------------------------------------------------------------------------------------- changes


def test_unfreezing_inside_the_optimizer_is_seen_at_the_next_layout():
    model = Net()
    model.backbone[0].requires_grad_(False)
    opt = _sgd(model.parameters())  # the optimizer holds the frozen layer too
    watched = _started(model, [opt])
    layout, _ = watched.layout_for(opt, [opt])
    assert layout.param_names == BACKBONE[2:] + HEAD
    model.backbone[0].requires_grad_(True)
    layout, change = watched.layout_for(opt, [opt])
    assert change == WatchChange(added=BACKBONE[:2], removed=(), late=BACKBONE[:2], total=6)
    assert layout.param_names == ALL
    assert "2 joined (backbone.0.weight, backbone.0.bias)" in change.describe()
    assert watched.layout_for(opt, [opt])[1] is None  # told once


def test_freezing_inside_the_optimizer_is_seen_by_check_and_the_next_layout_follows():
    model = Net()
    opt = _sgd(model.parameters())
    watched = _started(model, [opt])
    watched.layout_for(opt, [opt])
    model.head.requires_grad_(False)
    change = watched.check([opt])
    assert change == WatchChange(added=(), removed=HEAD, late=(), total=4)
    assert "2 left (head.weight, head.bias)" in change.describe()
    layout, change = watched.layout_for(opt, [opt])
    assert layout.param_names == BACKBONE and change is None
    assert watched.check([opt]) is None
    model.head.requires_grad_(True)  # back again: was trainable at the start, so not "late"
    layout, change = watched.layout_for(opt, [opt])
    assert change == WatchChange(added=HEAD, removed=(), late=(), total=6)
    assert layout.param_names == ALL


def test_a_new_optimizer_adds_its_parameters():
    model = Net()
    body = _sgd(model.backbone.parameters())
    watched = _started(model, [body])
    watched.layout_for(body, [body])
    assert watched.names == BACKBONE
    head = _sgd(model.head.parameters())
    layout, change = watched.layout_for(head, [body, head])
    assert layout.param_names == HEAD
    assert change == WatchChange(added=HEAD, removed=(), late=(), total=6)
    # an optimizer passed to layout_for but missing from the list is watched all the same
    other = _sgd(model.head.parameters())
    layout, change = watched.layout_for(other, [body])
    assert layout.param_names == HEAD and change is None  # the same tensors, the same names


def test_a_recreated_optimizer_over_the_same_parameters_is_no_change():
    model = Net()
    opt = _sgd(model.parameters())
    watched = _started(model, [opt])
    first, _ = watched.layout_for(opt, [opt])
    new = _sgd(model.parameters())
    layout, change = watched.layout_for(new, [new])
    assert change is None and layout.param_names == first.param_names


def test_a_parameter_group_added_is_seen_at_the_next_layout():
    model = Net()
    opt = _sgd(model.backbone.parameters())
    watched = _started(model, [opt])
    watched.layout_for(opt, [opt])
    opt.add_param_group({"params": list(model.head.parameters()), "lr": 0.01})
    layout, change = watched.layout_for(opt, [opt])
    assert change == WatchChange(added=HEAD, removed=(), late=(), total=6)
    assert layout.param_names == ALL


def test_a_parameter_group_removed_is_seen_at_the_next_layout():
    model = Net()
    opt = _sgd([{"params": list(model.backbone.parameters())}, {"params": list(model.head.parameters())}])
    watched = _started(model, [opt])
    watched.layout_for(opt, [opt])
    del opt.param_groups[1]
    layout, change = watched.layout_for(opt, [opt])
    assert change == WatchChange(added=(), removed=HEAD, late=(), total=4)
    assert layout.param_names == BACKBONE


def test_unfreezing_outside_every_optimizer_changes_nothing_watched():
    model = Net()
    model.backbone.requires_grad_(False)
    opt = _sgd(model.head.parameters())
    watched = _started(model, [opt])
    layout, _ = watched.layout_for(opt, [opt])
    assert layout.param_names == HEAD
    model.backbone.requires_grad_(True)
    assert watched.check([opt]) is None  # no optimizer updates the backbone: nothing to watch, nothing to restart
    layout, change = watched.layout_for(opt, [opt])
    assert layout.param_names == HEAD and change is None
    assert watched.model_layout.param_names == ALL  # the model's trainable parameters did change


def test_unfreezing_inside_the_optimizer_is_seen_by_check_too():
    model = Net()
    model.backbone.requires_grad_(False)
    opt = _sgd(model.parameters())
    watched = _started(model, [opt])
    watched.layout_for(opt, [opt])
    model.backbone.requires_grad_(True)
    assert watched.check([opt]) == WatchChange(added=BACKBONE, removed=(), late=BACKBONE, total=6)
    layout, change = watched.layout_for(opt, [opt])
    assert change is None and layout.param_names == ALL


def test_tensors_replaced_under_the_same_names_are_a_change():
    model = Net()
    opt = _sgd([{"params": list(model.backbone.parameters())}, {"params": list(model.head.parameters())}])
    watched = _started(model, [opt])
    watched.layout_for(opt, [opt])
    model.head = nn.Linear(8, 2)  # a new head, same names and sizes
    opt.param_groups[1]["params"] = list(model.head.parameters())  # a new list: seen at the next layout
    layout, change = watched.layout_for(opt, [opt])
    assert change == WatchChange(added=(), removed=(), late=(), total=6)
    assert "are other tensors" in change.describe()
    assert layout.params[-2] is model.head.weight and layout.params[-1] is model.head.bias


def test_tensors_replaced_inside_the_same_group_list_are_seen_by_check():
    model = Net()
    opt = _sgd([{"params": list(model.backbone.parameters())}, {"params": list(model.head.parameters())}])
    watched = _started(model, [opt])
    old, _ = watched.layout_for(opt, [opt])
    model.head = nn.Linear(8, 2)
    opt.param_groups[1]["params"][:] = list(model.head.parameters())  # the same list object, same length
    change = watched.check([opt])
    assert change == WatchChange(added=(), removed=(), late=(), total=6)
    layout, change = watched.layout_for(opt, [opt])
    assert change is None and layout is not old and layout.params[-2] is model.head.weight


def test_parameters_swapped_inside_an_optimizer_s_group_list_are_seen_by_check():
    # the model's trainable parameters and the group's list and length stay the same: only check() can tell
    model = Net()
    opt = _sgd(model.head.parameters())
    watched = _started(model, [opt])
    watched.layout_for(opt, [opt])
    opt.param_groups[0]["params"][:] = list(model.backbone[2].parameters())
    change = watched.check([opt])
    assert change == WatchChange(added=BACKBONE[2:], removed=HEAD, late=(), total=2)
    assert watched.layout_for(opt, [opt])[0].param_names == BACKBONE[2:]


def test_a_new_model_with_the_same_names_is_a_change():
    model = Net()
    opt = _sgd(model.parameters())
    watched = _started(model, [opt])
    watched.layout_for(opt, [opt])
    model2 = Net()
    opt2 = _sgd(model2.parameters())
    watched.start(model2, [opt2])  # the same WatchedSet for a second run
    layout, change = watched.layout_for(opt2, [opt2])
    assert change == WatchChange(added=(), removed=(), late=(), total=6)
    assert layout.params[0] is model2.backbone[0].weight


# ---------------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("backbone", None, BACKBONE),
        (None, r"\.bias$", ("backbone.0.weight", "backbone.2.weight", "head.weight")),
        (r"backbone\.2|head", r"bias", ("backbone.2.weight", "head.weight")),
    ],
)
def test_include_and_exclude_select_the_watched_parameters(include, exclude, expected):
    model = Net()
    opt = _sgd(model.parameters())
    watched = _started(model, [opt], include=include, exclude=exclude)
    layout, _ = watched.layout_for(opt, [opt])
    assert layout.param_names == expected and watched.names == expected
    assert watched.model_layout.param_names == expected


@pytest.mark.parametrize(("include", "exclude"), [("nothing_like_this", None), (None, "."), ("head", "head")])
def test_nothing_selected_is_a_value_error_naming_include_and_exclude(include, exclude):
    watched = WatchedSet(HealthOptions(include=include, exclude=exclude))
    with pytest.raises(ValueError, match="watches no parameter") as info:
        watched.start(Net(), [])
    message = str(info.value)
    assert f"`include`={include!r}" in message and f"`exclude`={exclude!r}" in message
    assert "backbone.0.weight" in message  # what the trainable parameters are called, to fix the pattern


def test_frozen_parameters_that_would_be_watched_are_waiting_not_an_error():
    model = Net()
    model.backbone.requires_grad_(False)
    opt = _sgd(model.parameters())
    watched = _started(model, [opt], include="backbone")
    assert watched.waiting == BACKBONE
    layout, change = watched.layout_for(opt, [opt])
    assert len(layout) == 0 and change is None
    model.backbone.requires_grad_(True)
    layout, change = watched.layout_for(opt, [opt])
    assert layout.param_names == BACKBONE
    assert change == WatchChange(added=BACKBONE, removed=(), late=BACKBONE, total=4)


# ---------------------------------------------------------------------------------------------------- sparse


class SparseNet(nn.Module):
    def __init__(self, sparse: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 1)


@pytest.mark.parametrize("clip", ["value", "agc"])
@pytest.mark.parametrize("frozen", [False, True])
def test_elementwise_clipping_of_a_sparse_embedding_is_refused_at_start(clip, frozen):
    model = SparseNet()
    model.emb.requires_grad_(not frozen)  # a frozen one would be refused when unfrozen: at the start instead
    extra = {"clip_value": 0.1} if clip == "value" else {}
    watched = WatchedSet(HealthOptions(clip=clip, **extra))
    with pytest.raises(UnsupportedSetupError, match=rf"clip={clip!r}\) does not clip sparse gradients") as info:
        watched.start(model, [_sgd(model.parameters())])
    assert isinstance(info.value, ValueError) and isinstance(info.value, GradientHealthError)
    assert "emb.weight" in str(info.value)


def test_a_sparse_embedding_is_accepted_by_norm_clipping_and_marked_sparse():
    model = SparseNet()
    opt = _sgd(model.parameters())
    watched = _started(model, [opt], clip="norm")
    layout, _ = watched.layout_for(opt, [opt])
    assert layout.param_names == ("emb.weight", "head.weight", "head.bias")
    assert layout.sparse == frozenset({0}) and watched.sparse_layers == frozenset({"emb"})
    # a dense embedding is not sparse, but its layer is still one whose zeros are by design
    dense = SparseNet(sparse=False)
    opt = _sgd(dense.parameters())
    watched = _started(dense, [opt], clip="value", clip_value=0.1)
    layout, _ = watched.layout_for(opt, [opt])
    assert layout.sparse == frozenset() and watched.sparse_layers == frozenset({"emb"})


class FunctionalLookup(nn.Module):
    """A bare parameter looked up with ``F.embedding(..., sparse=True)``: no module announces it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(F.embedding(idx, self.table, sparse=True))


def test_sparse_gradients_found_at_the_first_step_are_marked_or_refused():
    model = FunctionalLookup()
    opt = _sgd(model.parameters())
    model(torch.tensor([1, 2, 3])).sum().backward()
    assert model.table.grad.is_sparse
    watched = _started(model, [opt], clip="norm")
    layout, _ = watched.layout_for(opt, [opt])
    assert layout.param_names == ("table", "head.weight", "head.bias") and layout.sparse == frozenset({0})
    refusing = _started(model, [opt], clip="value", clip_value=0.1)  # nothing to see before a gradient exists
    with pytest.raises(UnsupportedSetupError, match=r"\['table'\]"):
        refusing.layout_for(opt, [opt])


# ---------------------------------------------------------------------------------------------------- state


def test_a_resumed_set_compares_against_the_saved_names():
    model = Net()
    opt = _sgd(model.parameters())
    before = _started(model, [opt])
    before.layout_for(opt, [opt])
    state = before.state_dict()
    assert state == list(ALL)

    # resumed with the same parameters (new tensors, as loaded from a checkpoint): no false change
    resumed_model = Net()
    resumed_opt = _sgd(resumed_model.parameters())
    resumed = WatchedSet(HealthOptions())
    resumed.load_state_dict(state)
    resumed.start(resumed_model, [resumed_opt], resumed=True)
    layout, change = resumed.layout_for(resumed_opt, [resumed_opt])
    assert change is None and layout.param_names == ALL and resumed.names == ALL

    # loaded after start (the other order) is the same
    late = _started(Net(), [])
    late.load_state_dict(state)
    opt3 = _sgd(late.model.parameters())
    assert late.layout_for(opt3, [opt3])[1] is None

    # a set that watched another model before loading compares against the names only, not the old tensors
    reused = _started(Net(), [])
    reused_opt = _sgd(reused.model.parameters())
    reused.layout_for(reused_opt, [reused_opt])
    reused.load_state_dict(state)
    reused_model = Net()
    reused.start(reused_model, [], resumed=True)
    opt4 = _sgd(reused_model.parameters())
    assert reused.layout_for(opt4, [opt4])[1] is None

    # resumed while the backbone is frozen now: what left is a change, compared against the saved names
    frozen_model = Net()
    frozen_model.backbone.requires_grad_(False)
    frozen_opt = _sgd(frozen_model.parameters())
    frozen = WatchedSet(HealthOptions())
    frozen.load_state_dict(state)
    frozen.start(frozen_model, [frozen_opt], resumed=True)
    _, change = frozen.layout_for(frozen_opt, [frozen_opt])
    assert change == WatchChange(added=(), removed=BACKBONE, late=(), total=2)


def test_a_resumed_checkpoint_without_names_takes_the_start_as_its_set():
    # a checkpoint of an earlier version has no names: the set at start is what it described
    model = Net()
    model.backbone.requires_grad_(False)
    opt = _sgd(model.parameters())
    watched = WatchedSet(HealthOptions())
    watched.load_state_dict(None)
    watched.start(model, [opt], resumed=True)
    assert watched.names == HEAD  # established at start, not at the first step
    model.backbone.requires_grad_(True)
    _, change = watched.layout_for(opt, [opt])
    assert change == WatchChange(added=BACKBONE, removed=(), late=BACKBONE, total=6)
