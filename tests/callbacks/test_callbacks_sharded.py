"""ESSMonitor's layer-split measurement (``distributed="split"``, ``ess_train.measure.distributed``).

Two 2-process CPU runs (gloo, in a subprocess with a timeout, so that a hang fails instead of blocking):

- DDP with ``distributed="split"``: rank 0's logged ESS per layer equals a one-process measurement of the
  same weights, each rank measured only its share of the layers, every rank holds the same state, and one
  rank's failing measurement is warned and skipped on every rank without a hang;
- Lightning's ``ModelParallelStrategy`` with FSDP2 (``torch.distributed.fsdp.fully_shard``), which runs on
  CPU with gloo (FSDP1, ``FullyShardedDataParallel``, and Lightning's ``FSDPStrategy`` need an accelerator:
  "FSDP needs a non-CPU accelerator device"): the parameters really are sharded, ``"auto"`` picks the split,
  and the probe forward runs on both ranks.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from ess_train.measure.distributed import Failure, Ranks, assign_layers
from tests import tolerances

pytestmark = pytest.mark.slow  # starts processes or trains (the fast lane: -m 'not slow')

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["layers.0", "layers.1", "layers.2"]
KEYS = ("avg_entropy", "max_entropy", "avg_tolerance", "utilization", "total", "per_kv")
# the same float32 math on the same operators in another process: at most a different summation order over
# 8 rows x 8 channels x 12 positions of ESS values (all >= 0, no cancellation; tests/tolerances.py)
RTOL = tolerances.tol(torch.float32, n=8 * 8 * 12)

COMMON = textwrap.dedent(
    """
    import json, os, sys, warnings
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from ess_train import measure as M
    from ess_train.callbacks import ESSMonitor
    from ess_train.measure import cost as B
    from ess_train.measure.stats import view_rows
    from tests.toy_modules import ToyDataModule, ToyLM

    def reference(module, monitor, dm):
        # one process, plain functions: the same probe, plan and weights as the monitor's last measurement
        inputs, slice_id = monitor._probe
        layers = M.find_layers(module)
        views = M.probe_views(module, inputs[: monitor.plan.rows], layers)
        kv = M.kv_pairs_for(dm, slice_id)
        out = {}
        for name, view in views.items():
            choice, L = monitor.plan.layers[name], view.op.seq_len
            stats = M.layer_ess(view_rows(view, choice.rows), layers[name].state_size(L),
                                choice.resolve(L), kv_pairs=kv, max_operators=choice.operators)
            out[name] = stats.metrics()
        return out

    def report(out, trainer, monitor, record, **extra):
        rank = trainer.global_rank
        torch.save(monitor.state_dict(), os.path.join(out, f"state{rank}.pt"))
        last = {name: {k: h[k][-1] for k in M.SUMMARY_KEYS} for name, h in monitor.history.items()}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"steps": monitor.totals["steps"], "measured_here": monitor.measured_here,
                       "last": last, "warnings": [str(w.message) for w in record], **extra}, f)
    """
)

DDP_SCRIPT = COMMON + textwrap.dedent(
    """
    from lightning.pytorch.strategies import DDPStrategy

    if __name__ == "__main__":
        out = sys.argv[1]
        pl.seed_everything(0)
        calls = []
        if os.environ.get("LOCAL_RANK", "0") == "1":  # rank 1's second layer measurement (step 2) raises
            import ess_train.measure.loop as LOOP  # (the one measurement loop calls layer_ess)
            real = LOOP.layer_ess
            def flaky(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    raise RuntimeError("injected failure")
                return real(*args, **kwargs)
            LOOP.layer_ess = flaky
        monitor = ESSMonitor(every_n_steps=2, distributed="split", strict=sys.argv[2:] == ["strict"])
        trainer = pl.Trainer(
            accelerator="cpu", devices=2,
            strategy=DDPStrategy(process_group_backend="gloo", start_method="popen"),
            max_steps=6, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0,
            log_every_n_steps=1, callbacks=[monitor], logger=CSVLogger(out, name="ddp", version=0),
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        model, dm = ToyLM(n_layers=3), ToyDataModule(n=64, batch_size=4, num_kv_pairs=3)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.fit(model, dm)
        ref = reference(model, monitor, dm) if trainer.global_rank == 0 else None
        params = float(sum(p.double().sum() for p in model.parameters()))
        report(out, trainer, monitor, record, reference=ref, params=params, split=monitor._split)
    """
)

FSDP_SCRIPT = COMMON + textwrap.dedent(
    """
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    class ShardedLM(ToyLM):
        def configure_model(self):
            from torch.distributed.fsdp import fully_shard
            mesh = self.device_mesh["data_parallel"]
            for layer in self.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    class Shards(pl.Callback):  # what one rank holds of a layer's parameters while training
        def on_train_start(self, trainer, pl_module):
            p = pl_module.layers[0].in_proj.weight
            self.local = list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape)

    if __name__ == "__main__":
        out = sys.argv[1]
        pl.seed_everything(0)
        monitor, shards = ESSMonitor(every_n_steps=2), Shards()  # distributed="auto": split here
        trainer = pl.Trainer(
            accelerator="cpu", devices=2,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
            log_every_n_steps=1, callbacks=[monitor, shards], logger=CSVLogger(out, name="fsdp", version=0),
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        model, dm = ShardedLM(n_layers=3), ToyDataModule(n=64, batch_size=4, num_kv_pairs=3)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.fit(model, dm)
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
        ref = None
        if trainer.global_rank == 0:
            plain = ToyLM(n_layers=3)
            plain.load_state_dict(full)
            ref = reference(plain, monitor, dm)
        report(out, trainer, monitor, record, reference=ref, split=monitor._split, local=shards.local)
    """
)


def run_script(tmp_path: Path, source: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def same(a: Any, b: Any) -> bool:
    """Exact equality of two (nested) checkpoint states."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # (NaN == NaN here)


def check_against_reference(r0: dict, expected_steps: list[int]) -> None:
    """Rank 0's last measurement, layer by layer, equals the one-process measurement of the same weights."""
    ref = r0["reference"]
    assert sorted(ref) == LAYERS and r0["steps"][-1] == expected_steps[-1]
    for name in LAYERS:
        for key in KEYS:
            assert r0["last"][name][key] == pytest.approx(ref[name][key], rel=RTOL, abs=0), (name, key)


def check_split(tmp_path: Path, r0: dict, r1: dict, measurements: int) -> None:
    """Each rank measured only its share (equal costs: round-robin), and both hold the same state."""
    assert r0["split"] and r1["split"]
    assert r0["measured_here"] == {"layers.0": measurements, "layers.2": measurements}
    assert set(r1["measured_here"]) == {"layers.1"}
    assert r0["steps"] == r1["steps"] and r0["last"] == r1["last"]
    s0 = torch.load(tmp_path / "state0.pt", weights_only=False)
    s1 = torch.load(tmp_path / "state1.pt", weights_only=False)
    # what a checkpoint holds does not depend on the rank that saved it, but for the warnings about media
    # that only rank 0, which has the loggers, gives
    w0, w1 = set(s0.pop("warned")), set(s1.pop("warned"))
    assert w1 <= w0 and all(key.startswith("media") for key in w0 - w1), (w0, w1)
    assert same(s0, s1)


# ------------------------------------------------------------------------------------------- in-process
def test_assign_layers_balances_cost_and_is_deterministic():
    names = ["a", "b", "c", "d"]
    assert assign_layers(names, {}, 2) == {"a": 0, "b": 1, "c": 0, "d": 1}  # no costs: round-robin
    owner = assign_layers(names, {"a": 10.0, "b": 1.0, "c": 1.0, "d": 1.0}, 2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 1}  # the costly layer alone on one rank
    assert assign_layers(names, {"a": 1.0}, 1) == dict.fromkeys(names, 0)
    assert assign_layers(names, {}, 8) == {"a": 0, "b": 1, "c": 2, "d": 3}  # more ranks than layers
    with pytest.raises(ValueError, match="world_size"):
        assign_layers(names, {}, 0)


def test_ranks_exchange_and_split_in_a_one_process_group(tmp_path):
    """The collectives themselves (pickled payloads, failure markers) in a real gloo group of one."""
    import torch.distributed as dist

    assert not Ranks().active  # no process group: one process, collectives the identity
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ranks = Ranks()
        assert ranks.active and (ranks.rank, ranks.world_size) == (0, 1)
        assert ranks.broadcast({"x": torch.arange(3)})["x"].tolist() == [0, 1, 2]
        parts, failures = ranks.exchange({"a": 1})
        assert parts == [{"a": 1}] and failures == []
        parts, failures = ranks.exchange(lambda: None)  # does not pickle: a failure, not a hang
        assert len(failures) == 1 and "pickle" in failures[0].error.lower() and failures[0].rank == 0
        found, failures, error = ranks.split(["a", "b"], {}, lambda name: name * 2)
        assert found == {"a": "aa", "b": "bb"} and not failures and error is None

        def boom(name: str) -> str:
            raise RuntimeError(f"bad {name}")

        found, failures, error = ranks.split(["a", "b"], {}, boom)
        assert found == {} and isinstance(error, RuntimeError)
        assert failures == [Failure(0, failures[0].error)] and "RuntimeError: bad a" in str(failures[0])
        assert str(failures[0]).startswith("rank 0: ")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ two processes
@pytest.mark.timeout(300)
def test_ddp_split_matches_one_process_and_survives_a_rank_failure(tmp_path):
    proc = run_script(tmp_path, DDP_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["params"] == pytest.approx(r1["params"], rel=1e-12)  # replicas: the same weights
    # measurements at optimizer steps 0, 2, 3 (validation), 4, 6; rank 1's share failed at step 2, so every
    # rank skipped that one (no hang: the failing rank still joined the exchange)
    assert r0["steps"] == [0, 3, 4, 6]
    failed = [w for w in r0["warnings"] if "ESSMonitor failed at step 2" in w]
    assert len(failed) == 1 and "rank 1: RuntimeError: injected failure" in failed[0], r0["warnings"]
    check_split(tmp_path, r0, r1, measurements=5)  # rank 0 measured its layers at step 2 too
    check_against_reference(r0, [0, 3, 4, 6])
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ess = [r for r in rows if r.get("ess/total")]
    assert [int(r["step"]) for r in ess] == [0, 2, 3, 5]  # once per measured step, from rank 0
    assert sum(1 for r in rows if r.get("tss/total")) == 1
    for name in LAYERS:  # what rank 0 logged: every layer, rank 1's too
        for key in KEYS:
            assert float(ess[-1][f"ess/{name}/{key}"]) == pytest.approx(r0["reference"][name][key], rel=RTOL)


@pytest.mark.timeout(300)
def test_ddp_split_strict_raises_on_every_rank(tmp_path):
    """strict=True: rank 1's failure ends the run on both ranks (the others learn of it from the exchange)
    instead of one rank dying while the other waits in a collective; the subprocess timeout catches a hang."""
    proc = run_script(tmp_path, DDP_SCRIPT, "strict")
    assert proc.returncode != 0
    expected = "RuntimeError: ESSMonitor failed at step 2 on rank 1: RuntimeError: injected failure"
    assert expected in proc.stderr, proc.stderr[-4000:]
    assert not (tmp_path / "rank0.json").exists()


@pytest.mark.timeout(300)
def test_fsdp2_model_parallel_strategy_splits_on_cpu(tmp_path):
    proc = run_script(tmp_path, FSDP_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["local"] == r1["local"] == [4, 8]  # an 8 x 8 weight, half on each rank: really sharded
    assert not [w for w in r0["warnings"] if "ESSMonitor" in w], r0["warnings"]
    assert r0["steps"] == [0, 2, 4]  # train start, steps 2 and 4 (validation at the same steps)
    check_split(tmp_path, r0, r1, measurements=3)
    check_against_reference(r0, [0, 2, 4])
