"""The options' reference, made from :class:`~lightning_gradhealth.config.options.HealthOptions`' own fields.

Each option's doc is written once, in its field's ``metadata["doc"]``. From it come the ``Args`` section of
``GradientHealthMonitor``'s docstring (:func:`with_args`, at import; LightningCLI's ``--help`` shows it) and the
tables of docs/options.md (:func:`render`). Regenerate the page after changing an option::

    python -m lightning_gradhealth.config.reference docs/options.md          # rewrite the tables
    python -m lightning_gradhealth.config.reference --check docs/options.md  # exit 1 when stale
"""

from __future__ import annotations

import argparse
import inspect
import re
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields
from pathlib import Path

from lightning_gradhealth.config.options import HealthOptions

__all__ = ["GROUPS", "args_section", "main", "markdown_table", "option_docs", "render", "with_args"]

#: The sections of docs/options.md, by an option's ``metadata["group"]``.
GROUPS = ("watched", "safety", "alerts")

_WIDTH = 120
_BLOCK = re.compile(r"(<!-- options: (\w+) -->\n).*?(<!-- /options -->)", re.DOTALL)


def option_docs() -> dict[str, str]:
    """Each option's doc (whitespace collapsed), in constructor order."""
    return {f.name: " ".join(f.metadata.get("doc", "").split()) for f in fields(HealthOptions)}  # (a test wants one)


def args_section() -> str:
    """The Google-style ``Args:`` section of the options, wrapped at 120 columns (not indented)."""
    lines = ["Args:"]
    for name, doc in option_docs().items():
        lines += textwrap.wrap(
            f"{name}: {doc}", _WIDTH - 4, initial_indent="    ", subsequent_indent="        ", break_on_hyphens=False
        )
    return "\n".join(lines)


def with_args(doc: str | None) -> str:
    """``doc`` (a class docstring) with :func:`args_section` inserted before its ``Raises:`` section (or at the end)."""
    text = inspect.cleandoc(doc or "")
    head, raises, tail = text.partition("\nRaises:")
    return f"{head.rstrip()}\n\n{args_section()}\n" + (f"\nRaises:{tail}" if raises else "")


def _markdown(doc: str) -> str:
    """A field doc (reStructuredText roles and literals) as a Markdown table cell."""
    doc = re.sub(r":\w+:`~?([\w.]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", doc)
    return doc.replace("``", "`").replace("|", "\\|")


def _default(f: Field[object]) -> str:
    if f.default_factory is not MISSING:
        return f"`{f.default_factory.__name__}()`"  # type: ignore[union-attr]
    value = f.default
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def markdown_table(group: str) -> str:
    """The Markdown table of the options of one section (:data:`GROUPS`), in constructor order."""
    if group not in GROUPS:
        raise ValueError(f"`group` must be one of {GROUPS}, got {group!r}.")
    rows = ["| option | default | what |", "|---|---|---|"]
    docs = option_docs()
    for f in fields(HealthOptions):
        if f.metadata.get("group") == group:
            rows.append(f"| `{f.name}` | {_default(f)} | {_markdown(docs[f.name])} |")
    return "\n".join(rows) + "\n"


def render(page: str) -> str:
    """``page`` with every ``<!-- options: GROUP -->`` … ``<!-- /options -->`` block holding that group's table."""
    return _BLOCK.sub(lambda m: m.group(1) + markdown_table(m.group(2)) + m.group(3), page)


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or, with ``--check``, check) the option tables of a Markdown page. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lightning_gradhealth.config.reference", description=main.__doc__)
    parser.add_argument("page", type=Path, help="the page, e.g. docs/options.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is stale, writing nothing")
    args = parser.parse_args(argv)
    text = args.page.read_text(encoding="utf-8")
    fresh = render(text)
    if args.check:
        if fresh != text:
            print(f"{args.page} is stale: run `python -m lightning_gradhealth.config.reference {args.page}`")
            return 1
        return 0
    args.page.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
