"""Distil a trained teacher (any ``SequenceModel``) into a student on the teacher's task inputs.

Loss on the scored (answer) positions: ``kl_weight * KL(teacher || student)`` at temperature ``T`` (times ``T^2``)
``+ ce_weight * CE(student, labels)``. A plain loop (AdamW, warm-up then cosine, grad clip 1): small models,
one CPU thread, no Lightning overhead. ``teacher=None`` with ``ce_weight > 0`` trains the student on labels
only (the no-teacher control).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.tasks.metrics import answer_accuracy

__all__ = ["compose_cfg", "load_trained", "distill", "evaluate", "model_ess"]


def compose_cfg(overrides: list[str], output_dir: str | Path = "/tmp/ess_unused"):
    """The app's config for ``overrides`` (as ``experiments.common.run_point`` composes it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ess_train.app.main import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*overrides, f"output_dir={output_dir}"])


def load_trained(overrides: list[str], run_dir: str | Path) -> tuple[nn.Module, Any]:
    """(model with the last checkpoint of ``run_dir`` loaded, its datamodule set up), from the run's overrides."""
    from hydra.utils import instantiate

    cfg = compose_cfg(overrides, run_dir)
    dm = instantiate(cfg.task)
    dm.setup("fit")
    model = instantiate(cfg.model, vocab_size=dm.vocab_size)
    ckpts = sorted(Path(run_dir, "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint under {run_dir}/checkpoints")
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval(), dm


def _batches(loader) -> Iterator[dict[str, Tensor]]:
    while True:
        yield from loader


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    datamodule: Any,
    steps: int = 300,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int = 30,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> list[float]:
    """Train ``student`` in place; returns the loss per step."""
    decay = [p for p in student.parameters() if p.dim() >= 2]
    rest = [p for p in student.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def sched(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        prog = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    lrs = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    student.train()
    losses = []
    batches = _batches(datamodule.train_dataloader())
    for _ in range(steps):
        batch = next(batches)
        x, y = batch["inputs"], batch["labels"]
        mask = y != -100
        logits = student(x)[mask].float()
        loss = logits.new_zeros(())
        if teacher is not None and kl_weight > 0:
            with torch.no_grad():
                t_logits = teacher(x)[mask].float()
            T = temperature
            loss = loss + kl_weight * T * T * F.kl_div(
                F.log_softmax(logits / T, -1),
                F.log_softmax(t_logits / T, -1),
                log_target=True,
                reduction="batchmean",
            )
        if ce_weight > 0:
            loss = loss + ce_weight * F.cross_entropy(logits, y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        lrs.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(
    student: nn.Module, teacher: nn.Module | None, datamodule: Any, max_batches: int | None = None
) -> dict[str, float]:
    """Answer accuracy of the student (and the teacher), KL(teacher || student) and CE on the validation set;
    with a teacher also ``agreement`` (top-1 of student = top-1 of teacher) and ``teacher_entropy`` (mean
    entropy of the teacher's answer distribution, the scale KL is read against)."""
    student.eval()
    correct = total = 0
    t_correct = 0
    kl_sum = ce_sum = agree = t_entropy = 0.0
    for i, batch in enumerate(datamodule.val_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch["inputs"], batch["labels"]
        mask = y != -100
        logits = student(x)
        acc = answer_accuracy(logits, y)
        n = int(mask.sum())
        correct += float(acc["accuracy"]) * n
        total += n
        ls = logits[mask].float()
        ce_sum += float(F.cross_entropy(ls, y[mask], reduction="sum"))
        if teacher is not None:
            t_logits = teacher(x)
            t_correct += float(answer_accuracy(t_logits, y)["accuracy"]) * n
            t_ls = t_logits[mask].float()
            agree += float((ls.argmax(-1) == t_ls.argmax(-1)).sum())
            t_logp = F.log_softmax(t_ls, -1)
            t_entropy += float(-(t_logp.exp() * t_logp).sum())
            kl_sum += float(
                F.kl_div(
                    F.log_softmax(ls, -1),
                    F.log_softmax(t_logits[mask].float(), -1),
                    log_target=True,
                    reduction="sum",
                )
            )
    out = {"acc": correct / max(total, 1), "ce": ce_sum / max(total, 1)}
    if teacher is not None:
        m = max(total, 1)
        out.update(
            kl=kl_sum / m, teacher_acc=t_correct / m, agreement=agree / m, teacher_entropy=t_entropy / m
        )
    return out


@torch.no_grad()
def model_ess(
    model: nn.Module, inputs: Tensor, num_positions: int = 16, mixer: str | None = "gla"
) -> dict[str, float]:
    """Entropy-ESS of every layer of type ``mixer`` (``None``: all) on ``inputs`` (the monitor's reduction),
    averaged over those layers:
    ``ess_per_op`` (mean per operator), ``ess_total`` (per layer: multiplicity x sum over operators),
    ``tss`` (per layer total), ``tss_per_op``."""
    from ess_train.measure import layer_ess

    model.eval()
    L = inputs.shape[1]
    n = min(num_positions, L - 1)
    positions = sorted({round(1 + k * (L - 2) / max(1, n - 1)) for k in range(n)})
    sizes = model.state_sizes(L)
    views = model.ess_operators(inputs)
    if mixer is not None:
        from ess_train.models import get_mixer_class

        cls = get_mixer_class(mixer)
        layers = model.ess_layers()
        views = {k: v for k, v in views.items() if isinstance(layers[k], cls)}
    stats = [layer_ess(v, sizes[k], positions, tolerance=False) for k, v in views.items()]
    k = len(stats)
    return {
        "ess_per_op": sum(s.avg_entropy for s in stats) / k,
        "ess_total": sum(s.total for s in stats) / k,
        "tss": sum(sizes[n].total for n in views) / k,
        "tss_per_op": sum(sizes[n].per_operator for n in views) / k,
    }
