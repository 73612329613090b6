"""The documentation holds in a clone: every relative link resolves inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    path
    for path in [
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("*/README.md"),
        *ROOT.glob("*/*/README.md"),
    ]
    + [ROOT / "experiments" / "RESULTS.md"]
    # the repository's own docs, not those of tool caches or environments (.pytest_cache/, .venv/, .fla-env/)
    if not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    assert doc.is_file()
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.relative_to(ROOT)} links {target}, which does not exist"
        inside = ROOT in path.parents or path == ROOT
        assert inside, f"{doc.relative_to(ROOT)} links {target} outside the repository"


def test_the_definitions_live_in_the_repository() -> None:
    text = (ROOT / "docs" / "ESS.md").read_text()
    assert "Effective state-size" in text
    for path in ROOT.glob("ess_train/**/*.py"):
        assert "shared/ESS.md" not in path.read_text(), f"{path} names the team's copy, not docs/ESS.md"


PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
# What a README example would spend on training: cut to a few steps, nothing else changed.
SHORTEN = {"max_steps=1000": "max_steps=3, limit_val_batches=1, enable_progress_bar=False"}


def readme_examples() -> list[str]:
    return PYTHON_BLOCK.findall((ROOT / "README.md").read_text())


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_python_examples_run(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of README.md runs as written (training cut to a few steps): its public
    imports and calls are the ones the package has."""
    code = readme_examples()[index]
    for old, new in SHORTEN.items():
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme_example"})
