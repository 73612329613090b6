"""The Hydra app: config validation, a tiny real run, W&B offline output, sweeps, SLURM script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from ess_train.app.main import CONFIG_DIR
from ess_train.app.validation import ConfigError, validate_config
from tests.wandb_offline import find_run_files, history

ROOT = Path(__file__).resolve().parents[2]
# a tiny MQAR run: seconds on a CPU
TINY = [
    "task.num_train=256",
    "task.num_test=64",
    "task.seq_len=32",
    "task.num_kv_pairs=2",
    "task.vocab_size=64",
    "task.batch_size=32",
    "model.d_model=16",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.monitor.every_n_steps=2",
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _run_app(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None, timeout: int = 300):
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "ess_train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_default_config_composes_and_validates() -> None:
    cfg = _compose([])
    validate_config(cfg)
    assert cfg.model._target_ == "ess_train.models.SequenceModel"
    assert cfg.task._target_ == "ess_train.tasks.MQARDataModule"
    assert cfg.logger.offline is None  # W&B offline unless asked (logger.offline or WANDB_MODE=online)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("+model.n_layer=3", "model.n_layer"),
        ("+task.num_kv_pair=3", "task.num_kv_pair"),
        ("+trainer.max_step=3", "trainer.max_step"),
        ("+callbacks.monitor.every_n_step=3", "callbacks.monitor.every_n_step"),
        ("+optim.learning_rate=1e-3", "optim.learning_rate"),
        ("+sead=1", "sead"),
        ("+model.mixer_kwargs.num_head=2", "num_head"),
        ("model.mixer=[short_conv,glaa]", "glaa"),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(override: str, needle: str) -> None:
    cfg = _compose([override])
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_config(cfg)


def test_typo_suggests_the_right_key() -> None:
    cfg = _compose(["+model.n_layer=3"])
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override",
    [
        "+callbacks.regularizer.min_utilization=0.9",
        "+callbacks.regularizer.positions=8",
    ],
)
def test_regularizer_keys_validate(override: str) -> None:
    validate_config(_compose(["callbacks=regularized", override]))


def test_regularizer_typo_suggests_the_new_name() -> None:
    cfg = _compose(["callbacks=regularized", "+callbacks.regularizer.min_utilisation=0.9"])
    with pytest.raises(ConfigError, match="did you mean 'min_utilization'"):
        validate_config(cfg)


def test_override_of_missing_key_fails_at_compose_time() -> None:
    with pytest.raises(Exception, match="num_kv_pair"):
        _compose(["task.num_kv_pair=3"])


@pytest.mark.parametrize("group", ["model", "task", "trainer", "logger", "callbacks"])
def test_every_group_option_validates(group: str) -> None:
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    assert options, group
    for option in options:
        validate_config(_compose([f"{group}={option}"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "needle"),
    [("+model.n_layer=3", "model.n_layer"), ("model.mixer=[short_conv,glaa]", "unknown mixer 'glaa'")],
)
def test_cli_config_error_is_one_line_and_exit_2(tmp_path: Path, override: str, needle: str) -> None:
    proc = _run_app([override, f"hydra.run.dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Trainer.fit" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    (line,) = [ln for ln in proc.stderr.splitlines() if "configuration error" in ln]
    assert line.startswith("ess-train: configuration error:") and needle in line
    full = _run_app(
        [override, f"hydra.run.dir={tmp_path}"], cwd=tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"}
    )
    assert full.returncode != 0 and "Traceback" in full.stderr and "ConfigError" in full.stderr


@pytest.mark.slow
def test_tiny_run_writes_summary_and_offline_wandb_with_ess(tmp_path: Path) -> None:
    args = [*TINY, "trainer.enable_progress_bar=true", f"hydra.run.dir={tmp_path}/run"]
    proc = _run_app(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ess-train summary" in proc.stdout
    # the console: progress in steps toward max_steps, none of the known third-party warnings
    out = proc.stdout + proc.stderr
    assert "step 6/6" in out
    for noise in ("LeafSpec", "anonymous setting", "ESSWarning", "Tip: For seamless cloud"):
        assert noise not in out, noise
    log_lines = (tmp_path / "run" / "ess_train.log").read_text().splitlines()
    assert any("step 6/6" in ln for ln in log_lines) and any("ess-train summary" in ln for ln in log_lines)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert Path(summary["checkpoint"]).is_file() and summary["interrupted"] is None
    assert summary["steps"] == 6
    assert 0.0 <= summary["val_acc"] <= 1.0
    assert set(summary["ess"]["layers"]) == {"model.blocks.0.mixer", "model.blocks.1.mixer"}
    run_files = find_run_files(tmp_path / "run")
    assert len(run_files) == 1
    rows = history(run_files[0])
    keys = set().union(*rows)
    assert any(k.startswith("ess/model.blocks.0.mixer") for k in keys), sorted(keys)[:20]
    assert "val/acc" in keys


@pytest.mark.slow
def test_multirun_with_submitit_local(tmp_path: Path) -> None:
    proc = _run_app(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "model=gla,attention",
            "logger=csv",
            *TINY,
            "trainer.max_steps=2",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    runs = [json.loads(p.read_text()) for p in summaries]
    assert {run["steps"] for run in runs} == {2}
    assert sorted(o for run in runs for o in run["overrides"] if o.startswith("model=")) == [
        "model=attention",
        "model=gla",
    ]


@pytest.mark.slow
def test_slurm_launcher_writes_the_submission_script(tmp_path: Path) -> None:
    """A stand-in `sbatch` captures what the launcher submits (no cluster needed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    captured = tmp_path / "captured.sbatch"
    (bin_dir / "sbatch").write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            cp "$1" {captured}
            echo "Submitted batch job 4242"
            """
        )
    )
    # the stand-in cluster reports the job as failed, so the launcher returns at once
    (bin_dir / "sacct").write_text(
        '#!/bin/sh\necho "JobID|State|NodeList"\necho "4242_0|FAILED|n1"\necho "4242_1|FAILED|n1"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit only checks that it exists
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    proc = _run_app(
        [
            "-m",
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=gpu-long",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.gpus_per_node=1",
            "hydra.launcher.array_parallelism=3",
            "hydra.launcher.setup=['module load cuda','export WANDB_MODE=offline']",
            "model=gla,mamba",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
        env_extra={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
        timeout=120,
    )
    assert captured.exists(), proc.stderr[-3000:]
    script = captured.read_text()
    assert "#SBATCH --partition=gpu-long" in script
    assert "#SBATCH --time=90" in script
    assert "#SBATCH --gpus-per-node=1" in script
    assert "#SBATCH --array=0-1%2" in script  # two jobs (at most min(3, 2) at a time)
    assert "#SBATCH --job-name=ess_train" in script
    assert "module load cuda" in script and "export WANDB_MODE=offline" in script
    assert script.index("module load cuda") < script.index("srun")
    assert "submitit.core._submit" in script


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_experiment_files_validate_and_win_over_the_root_config(name: str) -> None:
    from omegaconf import OmegaConf

    cfg = _compose([f"experiment={name}"])
    validate_config(cfg)
    own = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{name}.yaml")
    own.pop("defaults", None)
    for key, value in OmegaConf.to_container(own, resolve=False).items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                if not isinstance(sub_value, (dict, list)):
                    assert cfg[key][sub] == sub_value, f"{name}: {key}.{sub}"
        elif not isinstance(value, list):
            assert cfg[key] == value, f"{name}: {key}"
