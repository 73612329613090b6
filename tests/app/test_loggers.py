"""The app's loggers: W&B without the ignored ``anonymous`` argument; CSV that a resumed run continues."""

from __future__ import annotations

import csv

import pytest

from ess_train.app.loggers import CSVLogger, WandbLogger, resolve_offline


def _rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(logger.experiment.metrics_file_path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_resumed_with_its_version_appends(tmp_path):
    first = CSVLogger(str(tmp_path), name="csv")
    first.log_metrics({"train/loss": 2.0}, step=0)
    first.log_metrics({"train/loss": 1.5, "ess/total": 7.0}, step=1)
    first.save()
    resumed = CSVLogger(str(tmp_path), name="csv", version=first.version)
    resumed.log_metrics({"train/loss": 1.0}, step=2)
    resumed.log_metrics({"train/loss": 0.5, "val/acc": 0.9}, step=3)  # a new column: header rewritten
    resumed.save()
    rows = _rows(resumed)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert rows[1]["ess/total"] == "7.0" and rows[3]["val/acc"] == "0.9"
    assert CSVLogger(str(tmp_path), name="csv").version != first.version  # a fresh run: a new version


def test_wandb_logger_drops_the_ignored_anonymous_argument(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" not in logger._wandb_init
    asked = WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)
    assert asked._wandb_init["anonymous"] == "allow"


@pytest.mark.parametrize(
    ("env", "offline", "expected"),
    [
        (None, None, True),  # the app's default: offline, no account, no network
        ("online", None, False),  # issue 25, finding 9: WANDB_MODE=online used to stay offline silently
        ("run", None, False),
        ("offline", None, True),
        ("disabled", None, False),  # (wandb then disables the run itself)
        ("online", True, True),  # an explicit logger.offline wins over the environment
        (None, False, False),
    ],
)
def test_wandb_mode_from_the_environment_is_honoured(monkeypatch, env, offline, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert resolve_offline(offline) is expected


def test_online_wandb_gives_up_within_its_init_timeout(tmp_path, monkeypatch):
    """A bad key or an unreachable server used to wait 115-130 s: wandb.init now has 20 s (settable)."""
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = WandbLogger(save_dir=str(tmp_path))  # nothing contacted until the first log
    assert logger._offline is False and logger._wandb_init["settings"].init_timeout == 20.0
    assert WandbLogger(save_dir=str(tmp_path), init_timeout=5)._wandb_init["settings"].init_timeout == 5.0
    with pytest.raises(ValueError, match="init_timeout"):
        WandbLogger(save_dir=str(tmp_path), init_timeout=0)


def test_wandb_steps_are_the_trainer_steps(tmp_path, monkeypatch):
    """W&B's _step is the trainer step, so a resumed run continues the axis instead of restarting at 0."""
    calls = []

    class Run:
        def log(self, data, step=None):
            calls.append((data, step))

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logger._experiment = Run()
    monkeypatch.setattr(type(logger), "experiment", property(lambda self: self._experiment))
    logger.log_metrics({"ess/total": 3.0}, step=57)
    assert calls == [({"ess/total": 3.0, "trainer/global_step": 57}, 57)]
