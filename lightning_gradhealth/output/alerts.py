"""Alerts: structured, rate-limited messages about what a check found.

The alert lines go to the ``lightning_gradhealth`` logger. When nothing in the logging configuration would show
them (no handler on that logger or its ancestors: the default), :class:`_AlertPrinter` prints them on stderr the
way Python's last-resort handler would, but through ``tqdm.write`` while a tqdm progress bar (Lightning's default)
is on screen, so an alert gets a line of its own and the bar is redrawn below it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from lightning_gradhealth.schema.alert import Alert, Severity

__all__ = ["Alert", "AlertManager"]

log = logging.getLogger("lightning_gradhealth")





class _AlertPrinter(logging.Handler):
    """Python's last-resort output for the package's records, drawn around an active tqdm progress bar.

    It prints a record (``WARNING`` and above, the message alone, on stderr) only when no other handler sits on
    the ``lightning_gradhealth`` logger or the ancestors it propagates to: exactly when Python would have used
    ``logging.lastResort``. With a logging configuration of one's own (``logging.basicConfig``, pytest's
    ``caplog``, a file handler...) that configuration shows the records and this handler stays silent: no line is
    printed twice. Records always propagate, so ``caplog`` and other handlers see every one of them.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if _others_handle(record.name, self):
                return
            _write_line(self.format(record))
        except Exception:  # a handler never raises (logging.Handler.handleError reports it)
            self.handleError(record)


def _others_handle(name: str, me: logging.Handler) -> bool:
    """Whether a handler other than ``me`` is on logger ``name`` or on an ancestor its records propagate to."""
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        if any(h is not me for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def _write_line(line: str) -> None:
    """Write ``line`` on stderr; through ``tqdm.write`` (bars cleared, then redrawn) while a tqdm bar is open."""
    stream = sys.stderr
    if stream is None:  # pythonw and the like
        return
    try:
        from tqdm.std import tqdm
    except ImportError:  # tqdm comes with Lightning; a plain-PyTorch install may lack it
        tqdm = None
    if tqdm is not None and len(getattr(tqdm, "_instances", ())):
        tqdm.write(line, file=stream)
        return
    stream.write(line + "\n")
    stream.flush()


def _install_printer() -> None:
    if not any(isinstance(h, _AlertPrinter) for h in log.handlers):
        log.addHandler(_AlertPrinter())


_install_printer()


class AlertManager:
    """Emit alerts at most once per kind and layer per window of steps, counting what is held back.

    A more severe alert than the last one emitted for the same kind and layer always goes out, inside the window
    too (a critical after a warning reaches whoever listens for critical alerts).

    Args:
        window: Steps during which a second alert of the same kind and layer (and no higher severity) is held back.
        on_alert: Called with every emitted :class:`Alert` (on rank zero), e.g. to page someone.
        verbose: ``False`` prints no alert line (nothing is logged); alerts are still counted, rate-limited and
            passed to ``on_alert``.
    """

    def __init__(
        self, window: int = 100, on_alert: Callable[[Alert], Any] | None = None, *, verbose: bool = True
    ) -> None:
        self.window = window
        self.on_alert = on_alert
        self.verbose = verbose
        self.total = 0
        self._last: dict[tuple[str, str | None], int] = {}
        self._held: dict[tuple[str, str | None], int] = {}
        self._severity: dict[tuple[str, str | None], Severity] = {}  # of the last emitted alert per key
        self._printed: dict[tuple[str, bool], tuple[int, Severity]] = {}  # last line per kind (global or layers)

    # ------------------------------------------------------------------ emitting
    def __call__(self, alert: Alert, *, rank_zero: bool = True) -> bool:
        """Count ``alert`` and emit it (one log line, ``on_alert``) unless rate-limited. Returns whether it was."""
        admitted = self._admit(alert)
        if admitted is None:
            return False
        alert, last = admitted
        if rank_zero:
            if self.verbose:
                suffix = f" ({alert.held_back} similar alert(s) held back since step {last})" if alert.held_back else ""
                _log(alert.severity, f"[grad_health {alert.severity.value}] step {alert.step}: {alert.message}{suffix}")
            if self.on_alert is not None:
                self.on_alert(alert)
        return True

    def emit_step(self, alerts: Iterable[Alert], *, rank_zero: bool = True) -> list[Alert]:
        """Count and rate-limit the alerts of one step like :meth:`__call__`, but log one line per group.

        A group is the emitted alerts of one kind: those about layers make one line at the worst severity, naming
        how many layers, the first and the last (in the order given: depth order from the checks) and their values;
        a global alert (no layer) keeps its own line. A group of one alert logs the same line as :meth:`__call__`.
        Lines are rate-limited by kind: within ``window`` steps of a kind's line only a more severe one is printed.
        ``on_alert`` still gets every emitted alert, one by one.

        Args:
            alerts: The alerts of one step, in the order the checks produced them.
            rank_zero: Whether this process logs and calls ``on_alert`` (others only count).

        Returns:
            The emitted alerts (``held_back`` filled in), in the order given.
        """
        emitted: list[tuple[Alert, int | None]] = []
        for alert in alerts:
            admitted = self._admit(alert)
            if admitted is not None:
                emitted.append(admitted)
        if rank_zero:
            if self.verbose:
                groups: dict[tuple[str, bool], list[tuple[Alert, int | None]]] = {}
                for item in emitted:
                    groups.setdefault((item[0].kind, item[0].layer is None), []).append(item)
                for key, group in groups.items():
                    self._print_group(key, group)
            if self.on_alert is not None:
                for alert, _ in emitted:
                    self.on_alert(alert)
        return [alert for alert, _ in emitted]

    def _print_group(self, key: tuple[str, bool], group: list[tuple[Alert, int | None]]) -> None:
        """One line for a kind's alerts of a step, unless that kind was printed within the window at this severity.

        Lines are rate-limited by kind (per-layer alerts of one kind are one line), so a run that stays unhealthy
        prints a few lines per window, not one per layer; a more severe line always goes out.
        """
        worst = max((a.severity for a, _ in group), key=lambda sev: sev.rank)
        step = group[0][0].step
        printed = self._printed.get(key)
        if printed is not None and 0 <= step - printed[0] < self.window and worst.rank <= Severity(printed[1]).rank:
            return
        self._printed[key] = (step, worst)
        severe = [item for item in group if item[0].severity is worst]  # the worst first, then the others
        line = _group_line(severe)
        if len(severe) < len(group):
            line = line.replace(" Fix: ", f" (and {len(group) - len(severe)} more layer(s) less severe) Fix: ", 1)
        _log(worst, line)

    def _admit(self, alert: Alert) -> tuple[Alert, int | None] | None:
        """Count ``alert``; ``None`` if rate-limited, else it (``held_back`` filled in) and the previous step."""
        self.total += 1
        key = (alert.kind, alert.layer)
        last = self._last.get(key)
        if last is not None and 0 <= alert.step - last < self.window:
            previous = self._severity.get(key, Severity.WARNING)
            if Severity(alert.severity).rank <= Severity(previous).rank:
                self._held[key] = self._held.get(key, 0) + 1
                return None
        self._last[key] = alert.step
        self._severity[key] = alert.severity
        return replace(alert, held_back=self._held.pop(key, 0)), last

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters and rate-limit state."""
        return {
            "total": self.total,
            "last": [[k, layer, step] for (k, layer), step in self._last.items()],
            "held": [[k, layer, n] for (k, layer), n in self._held.items()],
            "severity": [[k, layer, sev.value] for (k, layer), sev in self._severity.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also one saved before the severities were kept: taken as warnings)."""
        self.total = int(state.get("total", 0))
        self._last = {(k, layer): int(step) for k, layer, step in state.get("last", ())}
        self._held = {(k, layer): int(n) for k, layer, n in state.get("held", ())}
        self._severity = {(k, layer): Severity(sev) for k, layer, sev in state.get("severity", ())}


def _log(severity: Severity, line: str) -> None:
    log.log(logging.ERROR if severity is Severity.CRITICAL else logging.WARNING, "%s", line)


def _split_fix(message: str) -> tuple[str, str]:
    """``"what. Fix: how."`` -> ``("what.", " Fix: how.")``."""
    head, sep, fix = message.partition(" Fix: ")
    return head, (sep + fix if sep else "")


def _group_line(group: list[tuple[Alert, int | None]]) -> str:
    """The one line of a group of emitted alerts of the same kind and severity."""
    first, last_step = group[0]
    prefix = f"[grad_health {first.severity.value}] step {first.step}: "
    held = sum(a.held_back for a, _ in group)
    if len(group) == 1:
        suffix = f" ({held} similar alert(s) held back since step {last_step})" if held else ""
        return prefix + first.message + suffix
    alerts = [a for a, _ in group]
    last = alerts[-1]
    values = ""
    if first.value is not None and last.value is not None:
        values = f", first/last {first.value:.2g} / {last.value:.2g}"
        if first.threshold is not None:
            values += f" vs line {first.threshold:g}"
    head, fix = _split_fix(first.message)
    # "layer net.0: gradient norm 5.7e-18 < 1e-07: vanishing gradient in this layer." -> the reason, in plural
    reason = head.removeprefix(f"layer {first.layer}: ")
    reason = reason.rsplit(": ", 1)[-1] if ": " in reason else reason
    reason = reason.replace("this layer", "these layers").replace("the weights", "their weights")
    suffix = f" ({held} similar alert(s) held back since the last ones)" if held else ""
    return f"{prefix}{first.kind} in {len(alerts)} layers ({first.layer} … {last.layer}{values}): {reason}{fix}{suffix}"
