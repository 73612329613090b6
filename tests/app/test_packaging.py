"""A wheel (non-editable install) carries the Hydra configs, so ``ess-train`` runs from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_runs_from_another_directory(tmp_path):
    source = tmp_path / "source"  # the tracked files (a build in the checkout would leave build/ there)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split():
        path, dest = REPO / name, source / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            dest.symlink_to(os.readlink(path))
        elif path.is_file():
            shutil.copy2(path, dest)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            ".",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("ess_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_configs = {f"ess_train/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert repo_configs and repo_configs <= names, sorted(repo_configs - names)[:5]
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))  # the installed wheel, not the source tree
    code = (
        "import ess_train, sys; print(ess_train.__file__); sys.argv = ['ess-train', '--cfg', 'job']; "
        "from ess_train.app.main import main; main()"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith(str(site)), run.stdout[:300]
    assert "_target_: ess_train.models.SequenceModel" in run.stdout
    assert not (elsewhere / "outputs").exists()  # --cfg job composes only
