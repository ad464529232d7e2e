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
