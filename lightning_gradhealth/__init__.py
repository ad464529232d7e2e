"""lightning-gradhealth: always-on gradient health monitoring for PyTorch Lightning.

The public names are imported on first use (PEP 562): ``import lightning_gradhealth`` alone imports neither
Lightning nor torch, so the ``gradhealth`` command line (``gradhealth report --help``) starts at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name comes from __getattr__ below
    from lightning_gradhealth.alerts import Alert, AlertManager
    from lightning_gradhealth.callback import GradientHealthMonitor
    from lightning_gradhealth.core import GradientHealth
    from lightning_gradhealth.engine import GradStatsEngine
    from lightning_gradhealth.errors import GradientHealthError, TrainingHealthError, UnsupportedSetupError
    from lightning_gradhealth.layout import ParamLayout, build_layout
    from lightning_gradhealth.metrics import LAYER_KEYS, SUMMARY_KEYS, record_to_metrics
    from lightning_gradhealth.options import HealthOptions
    from lightning_gradhealth.record import LayerStats, StepStats
    from lightning_gradhealth.thresholds import Severity, Thresholds

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Alert": "lightning_gradhealth.alerts",
    "AlertManager": "lightning_gradhealth.alerts",
    "GradientHealthMonitor": "lightning_gradhealth.callback",
    "GradientHealth": "lightning_gradhealth.core",
    "GradStatsEngine": "lightning_gradhealth.engine",
    "GradientHealthError": "lightning_gradhealth.errors",
    "TrainingHealthError": "lightning_gradhealth.errors",
    "UnsupportedSetupError": "lightning_gradhealth.errors",
    "ParamLayout": "lightning_gradhealth.layout",
    "build_layout": "lightning_gradhealth.layout",
    "LAYER_KEYS": "lightning_gradhealth.metrics",
    "SUMMARY_KEYS": "lightning_gradhealth.metrics",
    "record_to_metrics": "lightning_gradhealth.metrics",
    "HealthOptions": "lightning_gradhealth.options",
    "LayerStats": "lightning_gradhealth.record",
    "StepStats": "lightning_gradhealth.record",
    "Severity": "lightning_gradhealth.thresholds",
    "Thresholds": "lightning_gradhealth.thresholds",
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
