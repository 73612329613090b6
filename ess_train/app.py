"""The Hydra app: ``ess-train`` / ``python -m ess_train``.

Composes ``conf/`` (model, task, trainer, logger, callbacks, experiment), validates every key
before anything is built, trains, and prints a summary: accuracy (overall and per slice), ESS per
layer, and where the offline W&B run and the plots are.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ess_train.config import validate_config
from ess_train.lit import SequenceLM

__all__ = ["main", "train"]

log = logging.getLogger(__name__)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# conf/hydra/launcher/submitit_{local,slurm}.yaml keep the plugin's names on purpose, so Hydra validates them
# against the plugin's schema (unknown launcher keys are rejected); Hydra 1.3 warns that this matching is
# deprecated. hydra-core is pinned below 1.4 in pyproject.toml.
warnings.filterwarnings("ignore", message=r".*is validated against ConfigStore schema with the same name.*")


class _DropAdvertisements(logging.Filter):
    """Drop Lightning's "Tip: try installing <cloud product>" lines from the app's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())


def _build_logger(node: DictConfig | None) -> Any:
    if node is None or node.get("_target_") is None:
        return False
    return instantiate(node)


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, and return the run's summary (also written as summary.json)."""
    validate_config(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.task)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    module = SequenceLM(model, **OmegaConf.to_container(cfg.optim, resolve=True))
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    logger = _build_logger(cfg.logger)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger and hasattr(logger, "log_hyperparams"):
        # without the `hydra` node: a config composed with return_hydra_config=True (experiments/common.py)
        # carries it, and its runtime interpolations cannot be resolved outside a Hydra job
        hparams = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        logger.log_hyperparams(OmegaConf.to_container(hparams, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    final = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: _float(v) for k, v in (final[0] if final else trainer.callback_metrics).items()}

    out_dir = Path(str(cfg.output_dir))
    summary: dict[str, Any] = {
        "val_acc": metrics.get("val/acc", math.nan),
        "val_acc_per_slice": {
            k.removeprefix("val/acc/"): v for k, v in metrics.items() if k.startswith("val/acc/")
        },
        "steps": trainer.global_step,
        "output_dir": str(out_dir),
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
    }
    for cb in callbacks:
        if hasattr(cb, "summary"):
            summary["ess"] = cb.summary()
        if cfg.save_plots and hasattr(cb, "save_plots") and trainer.is_global_zero:
            summary["plots"] = [str(p) for p in cb.save_plots(out_dir / "plots")]
    experiment = getattr(logger, "experiment", None) if logger else None
    run_dir = getattr(experiment, "dir", None) or getattr(logger, "log_dir", None)
    if run_dir:
        summary["logger_dir"] = str(run_dir)
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(format_summary(summary))
    if logger and hasattr(logger, "finalize"):
        logger.finalize("success")
    if experiment is not None and hasattr(experiment, "finish"):
        experiment.finish()
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-run summary."""
    lines = ["", "=" * 72, f"ess-train summary  (steps: {summary['steps']})"]
    lines.append(f"  validation accuracy: {summary['val_acc']:.3f}")
    for name, acc in summary.get("val_acc_per_slice", {}).items():
        lines.append(f"    {name:<28s} {acc:.3f}")
    ess = summary.get("ess") or {}
    layers = ess.get("layers", {}) if isinstance(ess, dict) else {}
    if layers:
        lines.append(
            "  ESS per layer (entropy-ESS averaged over positions; utilization = ESS / its rank bound):"
        )
        for name, row in layers.items():
            cells = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            lines.append(f"    {name:<20s} {cells}")
    if "logger_dir" in summary:
        lines.append(f"  logger run directory: {summary['logger_dir']}")
        if "wandb" in summary["logger_dir"]:
            lines.append("    (offline W&B run: `wandb sync <that directory's parent>` uploads it)")
    if summary.get("plots"):
        lines.append(f"  ESS plots: {Path(summary['plots'][0]).parent}")
    lines.append(f"  summary.json: {summary['output_dir']}/summary.json")
    lines.append("=" * 72)
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Console entry point. Returns validation accuracy (for Hydra sweepers)."""
    return float(train(cfg)["val_acc"])
