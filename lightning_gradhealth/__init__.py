"""lightning-gradhealth: always-on gradient health monitoring for PyTorch Lightning.

The public names are imported on first use (PEP 562): ``import lightning_gradhealth`` alone imports neither
Lightning nor torch, so the ``gradhealth`` command line (``gradhealth report --help``) starts at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name comes from __getattr__ below
    from lightning_gradhealth.config.options import HealthOptions
    from lightning_gradhealth.config.recovery import Recovery
    from lightning_gradhealth.config.thresholds import Thresholds
    from lightning_gradhealth.core.health import GradientHealth
    from lightning_gradhealth.frontends.lightning import GradientHealthMonitor
    from lightning_gradhealth.model.layout import ParamLayout, build_layout
    from lightning_gradhealth.output.alerts import AlertManager
    from lightning_gradhealth.schema.alert import Alert, Severity
    from lightning_gradhealth.schema.errors import GradientHealthError, TrainingHealthError, UnsupportedSetupError
    from lightning_gradhealth.schema.metrics import LAYER_KEYS, SUMMARY_KEYS, record_to_metrics
    from lightning_gradhealth.schema.record import LayerStats, StepStats
    from lightning_gradhealth.stats.engine import GradStatsEngine

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Alert": "lightning_gradhealth.schema.alert",
    "AlertManager": "lightning_gradhealth.output.alerts",
    "GradientHealthMonitor": "lightning_gradhealth.frontends.lightning",
    "GradientHealth": "lightning_gradhealth.core.health",
    "GradStatsEngine": "lightning_gradhealth.stats.engine",
    "GradientHealthError": "lightning_gradhealth.schema.errors",
    "TrainingHealthError": "lightning_gradhealth.schema.errors",
    "UnsupportedSetupError": "lightning_gradhealth.schema.errors",
    "ParamLayout": "lightning_gradhealth.model.layout",
    "build_layout": "lightning_gradhealth.model.layout",
    "LAYER_KEYS": "lightning_gradhealth.schema.metrics",
    "SUMMARY_KEYS": "lightning_gradhealth.schema.metrics",
    "record_to_metrics": "lightning_gradhealth.schema.metrics",
    "HealthOptions": "lightning_gradhealth.config.options",
    "LayerStats": "lightning_gradhealth.schema.record",
    "StepStats": "lightning_gradhealth.schema.record",
    "Severity": "lightning_gradhealth.schema.alert",
    "Thresholds": "lightning_gradhealth.config.thresholds",
    "Recovery": "lightning_gradhealth.config.recovery",
}

__all__ = [
    "LAYER_KEYS",
    "SUMMARY_KEYS",
    "Alert",
    "AlertManager",
    "GradStatsEngine",
    "GradientHealth",
    "GradientHealthError",
    "GradientHealthMonitor",
    "HealthOptions",
    "LayerStats",
    "ParamLayout",
    "Recovery",
    "Severity",
    "StepStats",
    "Thresholds",
    "TrainingHealthError",
    "UnsupportedSetupError",
    "__version__",
    "build_layout",
    "record_to_metrics",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name in this module (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
