"""The README and docs/: short, complete, every link alive, every snippet runnable, nothing cited from outside."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_gradhealth.config.options import HealthOptions

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_fits_on_a_screen_or_two_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]  # the test command, run by CI
    assert f"```bash\n{ci}\n```" in text
    demo = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && gradhealth demo"
    assert f"```bash\n{demo}\n```" in text
    assert "![" in text and "(docs/images/tensorboard.png)" in text


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    targets = [t for t in LINK.findall(path.read_text()) if "://" not in t]
    for target in targets:
        assert (path.parent / target).exists(), f"{path.name}: {target}"


def test_every_docs_page_is_linked_from_the_readme_and_the_index():
    readme, index = README.read_text(), (DOCS / "README.md").read_text()
    for page in PAGES:
        if page.name == "README.md":
            continue
        assert f"(docs/{page.name})" in readme, page.name
        assert f"({page.name})" in index, page.name


def test_nothing_cites_notes_outside_the_repository():
    for path in [README, *PAGES]:
        text = path.read_text()
        assert not re.search(r"\bseeds? \d{3}", text, re.IGNORECASE), path.name
        assert "../shared" not in text, path.name


def test_every_option_is_documented():
    page = (DOCS / "options.md").read_text()
    for name in HealthOptions.names():
        assert f"`{name}`" in page, name


def test_the_readme_plain_loop_runs(tmp_path, monkeypatch):
    """The README's plain-loop snippet, as written, on a tiny model: TensorBoard events and the report."""
    import torch
    from torch import nn

    text = README.read_text()
    snippet = text.split("In a plain PyTorch or Fabric loop:\n\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(100)]
    scope = {
        "model": model,
        "loader": data,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.01),
        "loss_fn": nn.functional.mse_loss,
    }
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["health"].last_record is not None and scope["health"].last_record.step == 99
    assert list((tmp_path / "runs" / "exp1").glob("events.out.tfevents.*"))
    assert (tmp_path / "runs" / "exp1" / "gradient_health_report.md").is_file()
