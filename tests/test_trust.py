"""Issue 11's acceptance tests: the diagnosis judged on real architectures (``tests/archs.py``).

Healthy runs (ResNet-18, GPT-2, BERT, ViT, LSTM, each trained as people train them) must end with no finding and
no alert; natural pathologies (a learning rate above the stability limit, Adam at lr 1, a deep sigmoid conv net,
ReLUs killed by one huge step, a learning-rate jump) must get the right finding, on the right layers, with the
right first fix, and alerts that reach CRITICAL before any NaN.

The builders' own behaviour (the healthy runs learn, the pathologies are what they claim) is checked too, so the
judge itself stays honest. Each model trains once per module (``results`` caches the runs).
"""

from __future__ import annotations

import math
import re
import statistics

import pytest
from archs import HEALTHY, LR_JUMP_STEP, RunResult, dead_unit_fractions, run

from lightning_gradhealth import Severity, TrainingHealthError


@pytest.fixture(scope="module")
def results():
    """Train each architecture at most once in this module; ``results(name)`` returns its RunResult."""
    cache: dict[str, RunResult] = {}

    def get(name: str) -> RunResult:
        if name not in cache:
            cache[name] = run(name)
        return cache[name]

    return get


def _describe(r: RunResult) -> str:
    findings = [f"{f.kind}/{f.severity.value} {list(f.layers[:3])}: {f.summary}" for f in r.findings]
    alerts = [f"step {a.step} {a.kind}/{a.severity.value} {a.layer}" for a in r.alerts[:8]]
    return f"{r.arch}: findings={findings} alerts={alerts} raised={r.raised!r}"


def _about_lr(fix: str) -> bool:
    return re.search(r"learning rate|\blr\b", fix, re.IGNORECASE) is not None


def _first_critical_step(r: RunResult, kinds: tuple[str, ...]) -> int | None:
    return next((a.step for a in r.alerts if a.severity is Severity.CRITICAL and a.kind in kinds), None)


# ============================================================================================ healthy architectures


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_run_trains(results, name):
    """The builder is healthy: it runs to the end, its gradients stay finite and the loss falls."""
    r = results(name)
    assert r.raised is None, _describe(r)
    assert len(r.losses) == HEALTHY[name].steps
    assert all(rec.is_finite for rec in r.records)
    assert statistics.median(r.losses[-10:]) < statistics.median(r.losses[:5]), r.losses


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_run_has_no_finding(results, name):
    r = results(name)
    assert r.findings == [], _describe(r)


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_run_has_no_alert_from_step_0(results, name):
    r = results(name)
    assert r.alerts == [], _describe(r)


# ============================================================================================ exploding linear model


def test_exploding_linear_is_what_it_claims(results):
    """SGD at 1.15x the stability limit: the norm grows ~x1.3 a step until the guard stops the run."""
    r = results("exploding_linear")
    assert isinstance(r.raised, TrainingHealthError)
    norms = [rec.total_norm for rec in r.records if rec.is_finite]
    growth = (norms[-1] / norms[20]) ** (1 / (len(norms) - 21))
    assert 1.2 < growth < 1.4
    assert r.first_nonfinite_step is not None


def test_exploding_linear_finding(results):
    r = results("exploding_linear")
    finding = r.kinds().get("exploding")
    assert finding is not None, _describe(r)
    assert finding.severity is Severity.CRITICAL
    assert finding.layers == ("model.0",)


def test_exploding_linear_first_fix_is_the_learning_rate(results):
    r = results("exploding_linear")
    assert _about_lr(r.kinds()["exploding"].fixes[0]), r.kinds()["exploding"].fixes


def test_exploding_linear_alerts_critical_before_nan(results):
    r = results("exploding_linear")
    critical = _first_critical_step(r, ("exploding", "diverging", "spike"))
    assert critical is not None, _describe(r)
    assert critical < r.first_nonfinite_step


# ============================================================================================ learning-rate jump


def test_lr_jump_is_what_it_claims(results):
    """The norm is ~2 before the jump and ~1e9 eight steps later; the run ends there, finite."""
    r = results("lr_jump")
    assert r.raised is None
    by_step = {rec.step: rec.total_norm for rec in r.records}
    before = statistics.median(by_step[s] for s in range(LR_JUMP_STEP - 10, LR_JUMP_STEP + 1))
    assert 1.0 < before < 3.0
    assert by_step[max(by_step)] > 1e8
    assert all(math.isfinite(v) for v in by_step.values())


def test_lr_jump_finding(results):
    r = results("lr_jump")
    finding = r.kinds().get("exploding") or r.kinds().get("diverging")
    assert finding is not None, _describe(r)
    assert finding.severity is Severity.CRITICAL
    assert finding.layers == ("model.0",)
    assert _about_lr(finding.fixes[0]), finding.fixes


def test_lr_jump_alerts_critical_before_nan(results):
    r = results("lr_jump")
    critical = _first_critical_step(r, ("exploding", "diverging", "spike"))
    assert critical is not None, _describe(r)
    assert LR_JUMP_STEP < critical < (r.first_nonfinite_step or math.inf)


# ============================================================================================ GPT-2 at lr 1 (Adam)


def test_gpt2_lr1_is_what_it_claims(results):
    """Adam at lr 1: the loss rises far above chance and stays there; the gradients never go non-finite."""
    r = results("gpt2_lr1")
    assert r.raised is None
    assert all(rec.is_finite for rec in r.records)
    assert statistics.median(r.losses[-20:]) > 3 * r.losses[0], r.losses


def test_gpt2_lr1_diverging_finding_with_lr_fix(results):
    r = results("gpt2_lr1")
    finding = r.kinds().get("diverging") or r.kinds().get("exploding")
    assert finding is not None, _describe(r)
    assert _about_lr(finding.fixes[0]), finding.fixes
    assert r.findings[0].kind in ("diverging", "exploding"), "the divergence is the first finding"


def test_gpt2_lr1_alerts_during_the_run(results):
    r = results("gpt2_lr1")
    assert any(a.kind in ("diverging", "exploding") for a in r.alerts), _describe(r)


# ============================================================================================ deep sigmoid conv net


def test_sigmoid_conv_vanishing_on_the_early_layers(results):
    r = results("sigmoid_conv")
    finding = r.kinds().get("vanishing")
    assert finding is not None, _describe(r)
    names = [lay.name for lay in r.records[-1].layers]  # depth order
    assert finding.layers[0] == "model.features.0"
    late = set(names[len(names) - max(1, len(names) // 4) :])  # the last quarter: the classifier side
    assert not late & set(finding.layers), finding.layers
    assert list(finding.layers) == sorted(finding.layers, key=names.index)


def test_sigmoid_conv_first_fix_replaces_the_sigmoid(results):
    fix = results("sigmoid_conv").kinds()["vanishing"].fixes[0]
    assert re.search(r"sigmoid", fix, re.IGNORECASE) and re.search(r"ReLU|GELU|residual", fix), fix
    assert not re.search(r"\buse (a )?sigmoid", fix, re.IGNORECASE), fix


# ============================================================================================ ReLUs killed by one step


def _killed(r: RunResult) -> tuple[str, ...]:
    """The layers whose ReLU units are mostly dead, measured on the trained network (ground truth)."""
    fractions = dead_unit_fractions(r.module.model, r.probe[0])
    return tuple(f"model.{k}" for k, v in fractions.items() if v > 0.5)


def test_dead_relu_is_what_it_claims(results):
    r = results("dead_relu")
    assert r.raised is None
    assert _killed(r) == ("model.0", "model.2", "model.4")


def test_dead_relu_finding(results):
    r = results("dead_relu")
    finding = r.kinds().get("dead")
    assert finding is not None, _describe(r)
    assert set(_killed(r)) <= set(finding.layers)
    assert any(_about_lr(fix) for fix in finding.fixes), finding.fixes


def test_dead_relu_names_exactly_the_killed_layers(results):
    r = results("dead_relu")
    assert r.kinds()["dead"].layers == _killed(r)
