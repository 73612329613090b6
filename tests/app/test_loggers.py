"""The app's loggers: W&B without the ignored ``anonymous`` argument; CSV that a resumed run continues."""

from __future__ import annotations

import csv

from ess_train.app.loggers import CSVLogger, WandbLogger


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
