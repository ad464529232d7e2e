"""Every constructor argument is validated; messages name the argument, the allowed values and what was received."""

from __future__ import annotations

import math
import re

import pytest

from lightning_gradhealth import GradientHealthMonitor


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps` must be an int >= 1 or None, got 0 \(type int\)"),
        ({"log_every_n_steps": 2.5}, TypeError, r"`log_every_n_steps` must be an int >= 1 or None, got 2.5"),
        ({"log_every_n_steps": True}, TypeError, r"`log_every_n_steps`.*got True \(type bool\)"),
        (
            {"group_by": "layer"},
            ValueError,
            r"`group_by` must be one of 'module' \| 'parameter' \| a callable.*got 'layer'",
        ),
        ({"group_by": 3}, TypeError, r"`group_by` must be one of .*got 3 \(type int\)"),
        ({"norm_type": 0.5}, ValueError, r"`norm_type` must be a float >= 1 .*or float\('inf'\), got 0.5"),
        ({"norm_type": math.nan}, ValueError, r"`norm_type` must be .*got nan"),
        ({"norm_type": "fro"}, TypeError, r"`norm_type` must be .*got 'fro' \(type str\)"),
        ({"include": "("}, ValueError, r"`include` must be a valid regular expression, got '\('"),
        ({"exclude": 5}, TypeError, r"`exclude` must be None, a regex string or a compiled re.Pattern, got 5"),
        ({"per_layer": "yes"}, TypeError, r"`per_layer` must be a bool, got 'yes'"),
        ({"stats": "all"}, ValueError, r"`stats` must be one of 'basic' \| 'full', got 'all'"),
        ({"guard_mode": "async"}, ValueError, r"`guard_mode` must be one of 'auto' \| 'sync' \| 'deferred', got 'async'"),
        ({"noise_scale": 1}, ValueError, r"`noise_scale` must be one of True \| False \| 'auto', got 1"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        GradientHealthMonitor(**kwargs)


def test_good_arguments():
    monitor = GradientHealthMonitor(
        log_every_n_steps=10,
        group_by=lambda n: n.split(".")[0],
        norm_type=math.inf,
        include=re.compile("net"),
        exclude=r"bias",
        per_layer=False,
        stats="full",
    )
    assert monitor.norm_type == math.inf
    assert monitor.include.pattern == "net" and monitor.exclude.pattern == "bias"
    assert GradientHealthMonitor(norm_type=1).norm_type == 1.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_norm": 5.0}, r"`max_norm` only applies to `clip='norm'`, got `max_norm=5.0` with `clip=None`"),
        ({"clip": "norm", "clip_value": 0.5}, r"`clip_value` only applies to `clip='value'`"),
        ({"agc_clip_factor": 0.1}, r"`agc_clip_factor` only applies to `clip='agc'`"),
        ({"clip": "zclip", "autoclip_history": 10}, r"`autoclip_history` only applies to `clip='autoclip'`"),
        ({"spike_z_thresh": None, "on_spike": "skip"}, r"need spike detection: got `spike_z_thresh=None`"),
        ({"spike_z_thresh": None, "spike_dir": "spikes"}, r"need spike detection"),
    ],
)
def test_arguments_that_would_do_nothing_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GradientHealthMonitor(**kwargs)


def test_two_monitors_in_one_trainer_have_distinct_state_keys(tmp_path):
    from conftest import TinyMLP, loader, make_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    early = GradientHealthMonitor(include=r"^net\.0")
    late = GradientHealthMonitor(include=r"^net\.4")
    assert early.state_key != late.state_key
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(callbacks=[early, late, ckpt], max_steps=2, enable_checkpointing=True)
    trainer.fit(TinyMLP(), loader())
    assert [lay.name for lay in early.last_record.layers] == ["net.0"]
    assert [lay.name for lay in late.last_record.layers] == ["net.4"]
