"""GracefulStop and StepProgressBar on a plain Trainer (the app-level test is test_app_resume.py)."""

from __future__ import annotations

import logging
import signal

import pytest
import torch

from ess_train.app.interrupt import GracefulStop, SIGTERMException
from ess_train.app.progress import StepProgressBar, format_duration
from tests.signal_at import SignalAt
from tests.toy_modules import ToyDataModule, ToyLM, make_trainer

requeue_signal = getattr(signal, "SIGUSR2", None)


@pytest.mark.skipif(requeue_signal is None, reason="no SIGUSR2 on this platform")
def test_requeue_signal_is_deferred_until_the_checkpoint_is_saved(tmp_path):
    """submitit's SIGUSR2 handler (requeue, then exit) runs only when the app says so, after the
    checkpoint."""
    calls: list[int] = []
    previous = signal.signal(requeue_signal, lambda signum, frame: calls.append(signum))
    try:
        stopper = GracefulStop(tmp_path / "last.ckpt")
        trainer = make_trainer(None, [stopper, SignalAt(2, int(requeue_signal))], max_steps=6)
        with pytest.raises(SIGTERMException):
            trainer.fit(ToyLM(), ToyDataModule())
        assert calls == []  # deferred
        assert stopper.stopped_by == "SIGUSR2"
        assert trainer.global_step == 2
        assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2
        stopper.run_deferred()
        assert calls == [int(requeue_signal)]
        # the original handler is back once fit is over
        assert signal.getsignal(requeue_signal) is not stopper._on_requeue
    finally:
        signal.signal(requeue_signal, previous)


def test_sigint_finishes_the_step_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    stopper = GracefulStop(tmp_path / "last.ckpt")
    trainer = make_trainer(None, [stopper, SignalAt(3, int(signal.SIGINT))], max_steps=8)
    with pytest.raises(SIGTERMException):
        trainer.fit(ToyLM(), ToyDataModule())
    assert stopper.stopped_by == "SIGINT" and stopper.saved == tmp_path / "last.ckpt"
    assert trainer.global_step == 3
    assert signal.getsignal(signal.SIGINT) is before


def test_no_signal_no_checkpoint(tmp_path):
    stopper = GracefulStop(tmp_path / "last.ckpt")
    make_trainer(None, [stopper], max_steps=3).fit(ToyLM(), ToyDataModule())
    assert stopper.stopped_by is None and not (tmp_path / "last.ckpt").exists()


def test_step_progress_counts_steps_toward_max_steps_across_epochs(caplog):
    """Without a terminal: plain lines 'step k/N' (log records), continuing over epoch boundaries."""
    bar = StepProgressBar(line_every=0.25, interactive=False)
    dm = ToyDataModule()  # a few batches per epoch, so 12 steps span several epochs
    trainer = make_trainer(None, [bar], max_steps=12, enable_progress_bar=True)
    with caplog.at_level(logging.INFO, logger="ess_train.app.progress"):
        trainer.fit(ToyLM(), dm)
    assert trainer.current_epoch >= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "ess_train.app.progress"]
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    assert all(line.split()[1].endswith("/12") for line in lines)
    assert steps == sorted(steps) and steps[-1] == 12 and len(steps) <= 6
    assert "left" in lines[-1] and "steps/s" in lines[-1]


def test_format_duration():
    assert format_duration(4.2) == "4s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m05s"
