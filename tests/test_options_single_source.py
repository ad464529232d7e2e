"""The options are declared once (HealthOptions' fields): the callback's signature, its docstring, LightningCLI's help
and docs/options.md all agree with them."""

from __future__ import annotations

import contextlib
import inspect
import io
from dataclasses import MISSING, fields
from pathlib import Path

import docstring_parser
import pytest
from lightning.pytorch.cli import LightningCLI
from test_lightning_cli import CLIModel

from lightning_gradhealth import GradientHealthMonitor, HealthOptions
from lightning_gradhealth.config import reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "options.md"


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def test_the_callback_signature_is_the_options_fields():
    params = list(inspect.signature(GradientHealthMonitor.__init__).parameters.values())[1:]  # (self)
    assert [p.name for p in params] == [f.name for f in fields(HealthOptions)]  # names, in order
    for p, f in zip(params, fields(HealthOptions), strict=True):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, p.name
        assert p.annotation == f.type, p.name  # (both the source text: `from __future__ import annotations`)
        assert p.default == _default(f), p.name
    # and the resolved types too, as LightningCLI/jsonargparse read them
    hints = inspect.get_annotations(GradientHealthMonitor.__init__, eval_str=True)
    from typing import get_type_hints

    assert {k: v for k, v in hints.items() if k != "return"} == get_type_hints(HealthOptions)


def test_every_option_has_a_doc_and_a_section():
    for f in fields(HealthOptions):
        assert len(f.metadata.get("doc", "").split()) >= 3, f.name
        assert f.metadata.get("group") in reference.GROUPS, f.name


def test_the_callback_docstring_args_are_the_options_docs():
    parsed = docstring_parser.parse(GradientHealthMonitor.__doc__, style=docstring_parser.DocstringStyle.GOOGLE)
    args = [(p.arg_name, " ".join(p.description.split())) for p in parsed.params if p.args[0] == "param"]
    docs = [(f.name, " ".join(f.metadata["doc"].split())) for f in fields(HealthOptions)]
    assert args == docs
    assert [r.type_name for r in parsed.raises] == ["TypeError", "ValueError"]  # the hand-written sections stay
    assert "Logged metrics" in GradientHealthMonitor.__doc__


def test_lightning_cli_help_shows_every_option_with_its_doc():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        LightningCLI(CLIModel, args=["fit", "--trainer.callbacks.help", "lightning_gradhealth.GradientHealthMonitor"])
    assert exit_.value.code == 0
    text = "".join(out.getvalue().split())  # argparse wraps the help at the terminal's width
    for f in fields(HealthOptions):
        assert f"--trainer.callbacks.{f.name}" in text, f.name
        assert "".join(f.metadata["doc"].split()) in text, f.name


def test_docs_options_page_is_generated_from_the_options():
    page = PAGE.read_text(encoding="utf-8")
    assert reference.render(page) == page, "stale: run `python -m lightning_gradhealth.config.reference docs/options.md`"
    for group in reference.GROUPS:
        assert f"<!-- options: {group} -->" in page
    for f in fields(HealthOptions):
        assert page.count(f"| `{f.name}` |") == 1, f.name
    # the defaults as the code has them (the page once said True for these two)
    assert "| `update_ratio` | `False` |" in page and "| `grad_cosine` | `False` |" in page
    assert "| `thresholds` | `Thresholds()` |" in page and '| `figure_every_n_steps` | `"auto"` |' in page


def test_the_check_fails_on_a_stale_page_and_the_rewrite_fixes_it(tmp_path, capsys):
    stale = tmp_path / "options.md"
    stale.write_text(PAGE.read_text(encoding="utf-8").replace("| `update_ratio` | `False` |", "| `update_ratio` | `True` |"))
    assert reference.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().out
    assert reference.main([str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == PAGE.read_text(encoding="utf-8")
    assert reference.main(["--check", str(stale)]) == 0


def test_the_markdown_cell_escapes_pipes_and_drops_roles():
    cell = reference._markdown("one ``|g|`` per :class:`~a.b.Thresholds` and :attr:`findings`")
    assert cell == r"one `\|g\|` per `Thresholds` and `findings`"
    with pytest.raises(ValueError, match=r"`group` must be one of .* got 'nope'"):
        reference.markdown_table("nope")
