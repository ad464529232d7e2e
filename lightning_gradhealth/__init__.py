"""lightning-gradhealth: always-on gradient health monitoring for PyTorch Lightning."""

from lightning_gradhealth.alerts import Alert, AlertManager
from lightning_gradhealth.callback import GradientHealthMonitor
from lightning_gradhealth.engine import GradStatsEngine
from lightning_gradhealth.errors import GradientHealthError
from lightning_gradhealth.layout import ParamLayout, build_layout
from lightning_gradhealth.metrics import LAYER_KEYS, SUMMARY_KEYS, record_to_metrics
from lightning_gradhealth.record import LayerStats, StepStats
from lightning_gradhealth.thresholds import Severity, Thresholds

__version__ = "0.1.0"

__all__ = [
    "LAYER_KEYS",
    "SUMMARY_KEYS",
    "Alert",
    "AlertManager",
    "GradStatsEngine",
    "GradientHealthError",
    "GradientHealthMonitor",
    "LayerStats",
    "ParamLayout",
    "Severity",
    "StepStats",
    "Thresholds",
    "__version__",
    "build_layout",
    "record_to_metrics",
]
