"""The three callbacks under a 2-process CPU DDP run (gloo): ESS is logged once per step from rank 0."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes or trains (the fast lane: -m 'not slow')

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy
    from ess_train.callbacks import ESSInitializer, ESSMonitor, ESSRegularizer
    from tests.toy_modules import ToyDataModule, ToyLM

    if __name__ == "__main__":
        out = sys.argv[1]
        pl.seed_everything(0)
        monitor = ESSMonitor(every_n_steps=2)
        reg = ESSRegularizer(weight=0.1, min_utilization=0.9)
        init = ESSInitializer(max_trials=3)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2,
            strategy=DDPStrategy(process_group_backend="gloo", start_method="popen"),
            max_steps=6, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0,
            log_every_n_steps=1,
            callbacks=[init, monitor, reg], logger=CSVLogger(out, name="ddp", version=0),
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        model = ToyLM()
        trainer.fit(model, ToyDataModule(n=64, batch_size=4))
        rank = trainer.global_rank
        params = float(sum(p.double().sum() for p in model.parameters()))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"measured": monitor.totals["steps"], "reg_calls": reg.num_calls, "params": params,
                       "init": {k: v["setting"] for k, v in init.report.items()}}, f)
    """
)


@pytest.mark.timeout(180)
def test_ddp_two_processes(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["measured"] == [0, 2, 3, 4, 6] and r1["measured"] == []  # rank 0 only
    assert r0["reg_calls"] == r1["reg_calls"] == 6  # the penalty is part of every rank's loss
    assert r0["params"] == pytest.approx(r1["params"], rel=1e-12)  # replicas stay identical
    assert r0["init"] == r1["init"] and r0["init"]
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ess_steps = [int(r["step"]) for r in rows if r.get("ess/total")]
    # exactly one row per measured step (optimizer steps 0, 2, 3, 4, 6, at Lightning's logging step)
    assert ess_steps == [0, 1, 2, 3, 5]
    assert any(r.get("ess/reg_loss") for r in rows)
    assert sum(1 for r in rows if r.get("tss/total")) == 1


EVAL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from ess_train.lit import SequenceLM
    from ess_train.models import SequenceModel
    from ess_train.tasks import MQARDataModule

    if __name__ == "__main__":
        out = sys.argv[1]
        pl.seed_everything(0)
        dm = MQARDataModule(
            vocab_size=32, seq_len=16, num_kv_pairs=2, num_train=64, num_test=13, batch_size=4
        )
        lm = SequenceLM(SequenceModel(vocab_size=32, d_model=16, n_layers=1, mixer="linear_attention"))
        trainer = pl.Trainer(
            accelerator="cpu", devices=2,
            strategy=DDPStrategy(process_group_backend="gloo", start_method="popen"),
            max_steps=2, val_check_interval=2, num_sanity_val_steps=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(lm, dm)
        acc = lm._val_accuracy
        expected = int((dm.test_data.labels != -100).sum())
        with open(os.path.join(out, f"eval{trainer.global_rank}.json"), "w") as f:
            json.dump({"scored": int(acc.total.sum()), "expected": expected}, f)
    """
)


@pytest.mark.timeout(180)
def test_ddp_validation_scores_every_example_once(tmp_path):
    """13 test rows on 2 ranks: DistributedSampler would score row 0 twice; the task loaders pad instead."""
    script = tmp_path / "ddp_eval.py"
    script.write_text(EVAL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "eval0.json").read_text())
    assert r0["scored"] == r0["expected"] > 0
