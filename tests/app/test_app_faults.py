"""What a run keeps under faults (issue 25, findings 1-4 and 6-8): in-process app runs of a tiny model.

A current last.ckpt at every validation (a plateau included); a copied run directory resumed twice; a
zero-byte, bit-flipped or deleted last.ckpt skipped for the newest intact checkpoint; a full disk (a 2 MiB
tmpfs) that leaves the previous checkpoint intact and says so; a non-finite run stopped at its step
without overwriting the last finite checkpoint (strict: an error); a second signal, a signal at start-up
and one after training; a second run into a directory a live run holds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ess_train.app import checkpoint_files
from ess_train.app.checkpoint_files import CheckpointWriteError, check_checkpoint, recorded_step
from ess_train.app.interrupt import SIGTERMException, StartupInterrupt
from ess_train.app.nonfinite import NonFiniteError, NonFiniteWarning
from ess_train.app.training import train
from ess_train.app.validation import ConfigError
from tests import fault_probes
from tests.app.test_app import ROOT, _compose

# 9 steps, validation (and so a checkpoint) every 3; no logger, no monitor, no plots: a fraction of a second
BASE = [
    "task.num_train=256",
    "task.num_test=64",
    "task.seq_len=32",
    "task.num_kv_pairs=2",
    "task.vocab_size=64",
    "task.batch_size=32",
    "model.d_model=16",
    "trainer.max_steps=9",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=none",
    "callbacks=none",
    "save_plots=false",
]
PLATEAU = ["optim.lr=1e-9"]  # val/acc never improves after the first validation: no new best-*.ckpt


def _train(run_dir: Path, *overrides: str) -> dict:
    return train(_compose([*BASE, f"output_dir={run_dir}", *overrides]))


def _callback(key: str, target: str, **kwargs) -> list[str]:
    args = [f"+callbacks.{key}._target_=tests.fault_probes.{target}"]
    return args + [f"+callbacks.{key}.{k}={v}" for k, v in kwargs.items()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _ckpt(run_dir: Path, name: str = "last.ckpt") -> Path:
    return run_dir / "checkpoints" / name


def test_last_checkpoint_follows_every_validation_on_a_plateau(tmp_path):
    """Finding 1: a kill at any step loses at most the steps since the last validation."""
    run = tmp_path / "run"
    fault_probes.SEEN.clear()
    _train(run, *PLATEAU, *_callback("probe", "LastCheckpointProbe", dirpath=run / "checkpoints"))
    held = dict(fault_probes.SEEN)
    assert held == {s: (None if s < 3 else s // 3 * 3) for s in range(9)}, held
    summary = _summary(run)
    assert summary["checkpoint"] == str(_ckpt(run)) and summary["checkpoint_step"] == 9 == summary["steps"]
    assert recorded_step(_ckpt(run, "best-step3.ckpt")) == 3  # the best is still the first


def test_a_copied_run_directory_resumed_twice_continues_from_its_newest_checkpoint(tmp_path):
    """Finding 2: the copy's first resume wrote last-v1.ckpt, its second loaded the stale last.ckpt."""
    first, copy = tmp_path / "first", tmp_path / "copy"
    _train(first, "trainer.max_steps=3")
    original = {p.name: p.read_bytes() for p in (first / "checkpoints").iterdir()}
    shutil.copytree(first, copy)
    assert _train(copy, f"resume={copy}", "trainer.max_steps=6")["steps"] == 6
    summary = _train(copy, f"resume={copy}", "trainer.max_steps=9")
    assert summary["resumed_from"] == str(_ckpt(copy)) and summary["steps"] == 9
    assert recorded_step(_ckpt(copy)) == 9
    assert not list((copy / "checkpoints").glob("last-v*")), sorted(os.listdir(copy / "checkpoints"))
    # the original directory is untouched (the copy never removes the original's best checkpoint)
    assert {p.name: p.read_bytes() for p in (first / "checkpoints").iterdir()} == original


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory) -> Path:
    """A 6-step run on a plateau: last.ckpt holds step 6, best-step3.ckpt step 3."""
    run = tmp_path_factory.mktemp("plateau") / "run"
    _train(run, *PLATEAU, "trainer.max_steps=6")
    return run


def _flip_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["zero bytes", "64 flipped bytes", "deleted"])
def test_a_bad_last_checkpoint_is_named_and_skipped_for_the_newest_intact_one(tmp_path, plateau_run, damage):
    """Finding 3: zero bytes gave a bare EOFError, flipped bytes loaded silently, a deleted last.ckpt with
    resume: auto restarted from step 0."""
    run = tmp_path / "run"
    shutil.copytree(plateau_run, run)
    last = _ckpt(run)
    if damage == "zero bytes":
        last.write_bytes(b"")
    elif damage == "64 flipped bytes":
        _flip_64_bytes(last)
    else:
        last.unlink()
    resume = "resume=auto" if damage == "deleted" else f"resume={run}"
    summary = _train(run, resume, "trainer.max_steps=9")
    assert summary["resumed_from"] == str(_ckpt(run, "best-step3.ckpt"))
    assert summary["steps"] == 9 and summary["val_acc"] == summary["val_acc"]  # not NaN
    if damage == "deleted":
        assert "resume_skipped" not in summary
    else:
        (message,) = summary["resume_skipped"]
        assert str(last) in message and "step 6" in message and "costs 3 steps" in message
        assert "fails its checksum" in message
    assert check_checkpoint(last).ok and recorded_step(last) == 9  # rewritten by the resumed run


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 2 MiB tmpfs (needs root: ``mount``). Where it cannot be mounted, a stand-in: once the ballast file
    exists, every write of a checkpoint (or its sidecar) fails with ENOSPC (the write is monkeypatched),
    while a small file (the summary) still fits, as on the tmpfs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)]
    mounted = subprocess.run(command, capture_output=True)
    if mounted.returncode != 0:
        real_write = checkpoint_files._HashingWriter.write

        def write(self, data):
            if (disk / "ballast").exists() and ".ckpt" in Path(self.f.name).name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(self, data)

        monkeypatch.setattr(checkpoint_files._HashingWriter, "write", write)
        yield disk, "simulated"
        return
    try:
        yield disk, "tmpfs"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(small_disk):
    """Finding 4: checkpoints staged in $TMPDIR and copied were truncated by a full disk; no summary."""
    disk, kind = small_disk
    run, ballast = disk / "run", disk / "ballast"
    leave = 40_000 if kind == "tmpfs" else "null"  # room for the summary, not for a checkpoint (120 kB)
    fill = _callback("fill", "FillDisk", path=ballast, at_step=6, leave=leave)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        _train(run, *fill)
    summary = _summary(run)
    assert summary["stopped"]["reason"] == "disk full" and summary["stopped"]["step"] == 6
    assert "last.ckpt of step 3 is intact" in summary["stopped"]["message"]
    assert summary["checkpoint_step"] == 3 and check_checkpoint(summary["checkpoint"]).ok
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["best-step3.ckpt", "best-step3.ckpt.json", "last.ckpt", "last.ckpt.json"], left
    ballast.unlink()  # space again: the run continues from step 3
    resumed = _train(run, f"resume={run}")
    assert resumed["resumed_from"] == str(_ckpt(run)) and resumed["steps"] == 9


@pytest.mark.parametrize(
    ("fault", "strict"),
    [("lr", True), ("lr", False), ("weight", False)],
)
def test_a_non_finite_run_stops_at_its_step_and_keeps_the_last_finite_checkpoint(tmp_path, fault, strict):
    """Finding 6: lr=inf or an inf weight trained to exit 0 at val_acc 0, strict mode included, and
    last.ckpt was overwritten with the NaN model. (``optim.lr=inf`` itself is refused before training now,
    by name: tests/app/test_arguments.py; here the rate goes to inf mid-run.)"""
    run = tmp_path / "run"
    name = "model.blocks.1.mlp.fc1.weight"
    overrides = _callback("poison", "Poison", at_step=4, what=fault, name=name)
    if strict:  # the app's strict mode: the ESS monitor's
        overrides += ["callbacks=default", "+callbacks.monitor.strict=true"]
        overrides += ["callbacks.monitor.every_n_steps=100"]
        with pytest.raises(NonFiniteError) as caught:
            _train(run, *overrides)
        err = caught.value
    else:
        with pytest.warns(NonFiniteWarning):
            _train(run, *overrides)
    stopped = _summary(run)["stopped"]
    if strict:
        assert (err.step, err.what) == (4, "parameter") and err.name and "learning rate inf" in str(err)
    assert stopped["step"] == 4
    if fault == "weight":
        assert stopped["reason"] == "non-finite loss" and stopped["where"] == name
    else:
        assert stopped["reason"] == "non-finite parameter" and "learning rate inf" in stopped["message"]
    assert recorded_step(_ckpt(run)) == 3 and check_checkpoint(_ckpt(run)).ok
    weights = torch.load(_ckpt(run), map_location="cpu", weights_only=False)["state_dict"]
    floats = [w for w in weights.values() if isinstance(w, torch.Tensor) and w.is_floating_point()]
    assert floats and all(torch.isfinite(w).all() for w in floats)


def test_a_second_signal_still_leaves_the_checkpoint_and_the_summary(tmp_path):
    """Finding 7: a second Ctrl-C while the stop was handled lost the checkpoint and the summary."""
    run = tmp_path / "run"
    with pytest.raises(SIGTERMException) as caught:
        _train(run, *_callback("twice", "SignalTwice", step=5))
    assert caught.value.code == 130
    summary = _summary(run)
    assert summary["interrupted"] == "SIGINT" and summary["steps"] == 5
    assert summary["checkpoint"] == str(_ckpt(run)) and recorded_step(_ckpt(run)) == 5
    assert check_checkpoint(_ckpt(run)).ok


def test_sigterm_after_training_is_not_ignored(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SIGTERMException) as caught:
        _train(run, *_callback("late", "SignalAtFinalValidation"))
    assert caught.value.code == 143
    summary = _summary(run)
    assert summary["interrupted"] == "SIGTERM" and summary["interrupted_after_training"] is True
    assert summary["steps"] == 9 and recorded_step(_ckpt(run)) == 9


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_a_clean_exit(tmp_path, capfd):
    with pytest.raises(StartupInterrupt) as caught:
        _train(tmp_path / "run", *_callback("early", "SignalAtSetup"))
    assert caught.value.code == 130
    assert "SIGINT during start-up: stopped before training began" in capfd.readouterr().err
    # and while the app's libraries are still being imported: a line, not a traceback
    # (at 1 s, inside numpy's or torch's import, a KeyboardInterrupt once became a RecursionError reported
    # as an unimportable target, status 2, or a C++ abort, status -6; start-up now exits from the handler)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for delay in (0.5, 1.0, 1.5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ess_train", f"hydra.run.dir={tmp_path}/cli{delay}"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            # SIGINT as a terminal's Ctrl-C finds it: a suite started as a shell's background job hands its
            # children SIGINT ignored (POSIX), which Python keeps until the app's own handler is in place
            preexec_fn=_default_sigint,
        )
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (delay, err[-2000:])
        assert "stopped before training began" in err and "Traceback" not in err


def test_a_second_live_run_into_the_same_directory_is_refused(tmp_path, caplog):
    """Finding 8: two runs in one directory; resume: auto adopted a live run."""
    run = tmp_path / "run"
    _train(run, "trainer.max_steps=3")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ess_train.app.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)",
            str(run),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in ("resume=auto", f"resume={run}", "resume=null"):
            with pytest.raises(ConfigError, match=rf"in use by a live run \(pid {holder.pid} "):
                _train(run, resume, "trainer.max_steps=6")
        assert _summary(run)["steps"] == 3  # nothing of the refused runs was written
    finally:
        holder.kill()
        holder.wait()
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="ess_train.app"):
        summary = _train(run, "trainer.max_steps=6")  # resume: auto
    assert summary["resumed_from"] == str(_ckpt(run)) and summary["steps"] == 6
    note = f"took over the lock of a run that is gone (pid {holder.pid}"
    assert any(note in r.message for r in caplog.records)


def test_overrides_given_with_resume_are_applied_or_refused_by_name(tmp_path):
    """Finding 10: optim.lr=... with resume= was silently ignored (the optimizer state the checkpoint
    restores kept the old rate); a model change was not refused."""
    run = tmp_path / "run"
    _train(run)  # 9 steps at lr 3e-3
    with pytest.raises(ConfigError, match=r"model\.d_model cannot change when a run continues"):
        train(_compose([f"resume={run}", "model.d_model=32"]))
    train(_compose([f"resume={run}", "trainer.max_steps=12", "optim.lr=0.02", "optim.weight_decay=0.0"]))
    state = torch.load(_ckpt(run), map_location="cpu", weights_only=False)
    assert state["global_step"] == 12
    decay, no_decay = state["optimizer_states"][0]["param_groups"]
    assert decay["initial_lr"] == no_decay["initial_lr"] == 0.02 and decay["weight_decay"] == 0.0
    assert state["lr_schedulers"][0]["base_lrs"] == [0.02, 0.02]
    assert state["hyper_parameters"]["lr"] == 0.02
