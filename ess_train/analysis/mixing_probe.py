"""Find unmeasured sequence mixing from structure, not class names: a causal-dependence probe.

A module *mixes along time* when its output at a position depends on its input at earlier positions.
:func:`unmeasured_mixing` runs one probe forward of the model (batch 1, a few tokens) with a forward hook
on every module that is neither a measured layer, nor inside one, nor around one. Each hook takes the
module's own input of that call (the first floating tensor argument, shaped ``[1, L, ...]`` or
``[1, C, L]``), adds noise of the input's own scale at the first half of the positions, re-runs the module
once on it (nested hooks stay quiet meanwhile) and compares the output at the second half: a change above
round-off (``8 eps`` of the output's dtype, relative to the output there) marks the module as mixing.
Position-wise modules (projections, norms, MLPs, MoE routing without capacity limits, rotary tables) give
bit-identical outputs there and are never listed.

Of the mixing modules, the innermost are reported (the decoder layer around an unmeasured mixer is not
also listed); a mixing module with no children (a ``Conv1d``, RecurrentGemma's ``rg_lru``) is reported
as its parent, the mixer that owns it, unless that parent holds a measured layer. Covered, hence never
probed: measured layers, their submodules (a Mamba mixer's ``conv1d``) and their ancestors. Not seen:
mixing done in the own forward code of a module that also holds a measured layer, modules whose input
is not a floating ``[batch, L, ...]`` / ``[batch, C, L]`` tensor, and calls that fail to re-run (those
are listed, with the error, rather than passed as not mixing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["unmeasured_mixing", "probe_length"]

#: relative change at the late positions above which a module mixes, in units of its output's eps. Position-
#: wise modules compute each row from that row alone: measured 0 on every per-token module of 10 tiny HF
#: models (float32 and bfloat16) but 7.6e-8 (0.6 eps) for one float32 GELU; mixers moved by 0.15 to 1.5
#: (relative) under the probe's perturbation, in both dtypes.
ROUND_OFF_EPS = 8.0


def probe_length(seq_len: int) -> int:
    """Tokens of the probe forward: 13 (prime, unlikely to equal a feature size) or fewer when the input is
    shorter."""
    return min(seq_len, 13)


def _first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            if isinstance(item, Tensor):
                return item
    if isinstance(x, dict) or hasattr(x, "values"):
        for item in x.values():
            if isinstance(item, Tensor):
                return item
    return None


def _locate_input(args: tuple, kwargs: dict[str, Any]) -> tuple[str, Any] | None:
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.is_floating_point():
            return ("args", i)
    keys = ["hidden_states", *kwargs]
    for k in keys:
        v = kwargs.get(k)
        if isinstance(v, Tensor) and v.is_floating_point():
            return ("kwargs", k)
    return None


def _time_axes(x: Tensor, L: int) -> list[int]:
    if x.dim() < 3:
        return []
    return [d for d in (1, 2) if x.shape[d] == L]


def _late(x: Tensor, axis: int, t0: int) -> Tensor:
    return x.narrow(axis, t0, x.shape[axis] - t0)


class _Probe:
    """Forward hooks that re-run each candidate module on its input perturbed at early positions."""

    def __init__(self, L: int) -> None:
        self.L, self.t0 = L, max(1, L // 2)
        self.mixing: set[str] = set()
        self.failed: dict[str, str] = {}
        self.quiet = False

    def hook(self, name: str) -> Callable[..., None]:
        def run(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if self.quiet or name in self.mixing:
                return
            where = _locate_input(args, kwargs)
            out = _first_tensor(output)
            if where is None or out is None or not out.is_floating_point():
                return
            x = args[where[1]] if where[0] == "args" else kwargs[where[1]]
            for axis in _time_axes(x, self.L):
                if out.dim() <= axis or out.shape[axis] != self.L:
                    continue
                try:
                    changed = self._rerun(module, args, kwargs, where, x, axis, out)
                except Exception as exc:  # a call that cannot be re-run: unknown, so listed
                    self.failed[name] = f"{type(exc).__name__}: {exc}"[:200]
                    return
                if changed:
                    self.mixing.add(name)
                    return

        return run

    def _rerun(
        self, module: nn.Module, args: tuple, kwargs: dict, where: tuple, x: Tensor, axis: int, out: Tensor
    ) -> bool:
        g = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
        scale = x.detach().float().std().clamp_min(1e-3).item()
        early = (torch.arange(self.L, device=x.device) < self.t0).to(x.dtype)
        shape = [1] * x.dim()
        shape[axis] = self.L
        x2 = x + scale * noise * early.view(shape)
        args2, kwargs2 = list(args), dict(kwargs)
        if where[0] == "args":
            args2[where[1]] = x2
        else:
            kwargs2[where[1]] = x2
        self.quiet = True
        try:
            out2 = _first_tensor(module(*args2, **kwargs2))
        finally:
            self.quiet = False
        if out2 is None or out2.shape != out.shape:
            return False
        ref = _late(out, axis, self.t0).detach().double()
        diff = (_late(out2, axis, self.t0).detach().double() - ref).abs().max()
        eps = torch.finfo(out.dtype).eps
        return bool(diff > ROUND_OFF_EPS * eps * ref.abs().max().clamp_min(1e-30))


def _inside(name: str, others: Iterable[str]) -> bool:
    return any(name.startswith(o + ".") for o in others if o)


@contextlib.contextmanager
def _hooks(model: nn.Module, names: list[str], probe: _Probe) -> Iterator[None]:
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(probe.hook(n), with_kwargs=True) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def unmeasured_mixing(
    model: nn.Module,
    measured: Iterable[str],
    run: Callable[[int], Any],
    seq_len: int,
    length: int | None = None,
) -> dict[str, str]:
    """Modules of ``model`` that mix along time and are not covered by a ``measured`` layer (see the module
    docstring), with the reason; ``run(n)`` runs the model's probe forward on its first ``n`` tokens
    (``n = length``, default :func:`probe_length` of ``seq_len``)."""
    found = [n for n in measured if n]
    if "" in set(measured):
        return {}
    L = probe_length(seq_len) if length is None else length
    if L < 2:
        return {}
    modules = dict(model.named_modules())
    candidates = [
        n
        for n, m in modules.items()
        if n
        and n not in found
        and not _inside(n, found)
        and not any(f.startswith(n + ".") for f in found)
        and not isinstance(m, (nn.ModuleList, nn.ModuleDict))
    ]
    probe = _Probe(L)
    with torch.no_grad(), _hooks(model, candidates, probe):
        run(L)
    innermost = {n for n in probe.mixing if not any(o.startswith(n + ".") for o in probe.mixing)}
    owners: set[str] = set()
    for n in innermost:
        parent = n.rsplit(".", 1)[0] if "." in n else ""
        lift = (
            not any(True for _ in modules[n].children())
            and parent in probe.mixing
            and not isinstance(modules[parent], (nn.ModuleList, nn.ModuleDict))
        )
        owners.add(parent if lift else n)
    out: dict[str, str] = {}
    for n in sorted(owners):
        if not _inside(n, owners):
            out[n] = (
                f"{type(modules[n]).__name__}: mixes along time (its output at later positions depends on "
                "earlier inputs) and no adapter measures it (not measured)"
            )
    for n, why in probe.failed.items():
        if n not in probe.mixing and not _inside(n, out) and n not in out:
            out[n] = (
                f"{type(modules[n]).__name__}: could not be probed for sequence mixing ({why}); not measured"
            )
    return out
