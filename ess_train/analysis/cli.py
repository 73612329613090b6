"""``ess-analyze PATH``: per-layer ESS of a causal LM checkpoint, with JSON and plots.

Loads a local checkpoint directory offline (``local_files_only``, ``HF_HUB_OFFLINE=1``), with
``trust_remote_code=False`` unless ``--trust-remote-code`` is given, and safetensors weights only unless
``--allow-pickle`` (then torch's ``weights_only`` loading). A hub id is loaded only with ``--hub``.
Tokens come from ``--text FILE`` (the checkpoint's tokenizer) or are random.

    ess-analyze ./my-llama --seq-len 512 --positions 16 --json ess.json --plots plots/
    ess-analyze ./my-llama --text corpus.txt --delimiter "</s>" --window 16 --plots plots/

``--delimiter`` adds the delimiter study (``ess_train.analysis.delimiter``): ESS profiles aligned at each
occurrence of the token, per layer and layer kind
(figure ``ess_delimiter.png``, numbers under ``"delimiter"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "load_checkpoint", "build_parser"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ess-analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="local checkpoint directory (or a hub id with --hub)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    p.add_argument(
        "--positions", default="16", help="count of evenly spaced positions, or 'all' (default 16)"
    )
    p.add_argument("--text", type=Path, help="text file tokenized with the checkpoint's tokenizer")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--plots", type=Path, help="write the ESS profile and utilization plots in this folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument("--no-check", action="store_true", help="skip the exactness check at first capture")
    p.add_argument("--hub", action="store_true", help="PATH is a hub id: download it (online)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin weights (torch weights_only=True)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--delimiter", help="align ESS at each occurrence of this token (a token string, or id:N)")
    p.add_argument("--window", type=int, default=16, help="delimiter study: tokens either side (default 16)")
    return p


def _weights_kind(path: Path) -> str:
    names = [f.name for f in path.iterdir()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return "safetensors"
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        return "pickle"
    raise CLIError(f"no model weights in {path} (found: {', '.join(sorted(names)) or 'nothing'})")


def load_checkpoint(
    path: str,
    *,
    hub: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """``(model, config)`` of the causal LM at ``path``, loaded as the module docstring says."""
    from ess_train.adapters import require_transformers

    try:
        require_transformers()
    except ImportError as exc:
        raise CLIError(str(exc)) from exc
    local = Path(path)
    if not hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not local.is_dir():
            raise CLIError(f"checkpoint directory not found: {local} (pass --hub to load a hub id)")
        if not (local / "config.json").is_file():
            raise CLIError(f"not a checkpoint directory (no config.json): {local}")
        kind = _weights_kind(local)
        if kind == "pickle" and not allow_pickle:
            raise CLIError(
                f"{local} holds pickled weights (.bin/.pt) and no safetensors; unpickling runs code from the "
                "file: pass --allow-pickle to load it with torch weights_only=True"
            )
    from transformers import AutoConfig, AutoModelForCausalLM

    opts = {"local_files_only": not hub, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **opts)
    except Exception as exc:  # bad JSON, unknown model type, remote code refused
        raise CLIError(f"cannot read the checkpoint config in {path}: {type(exc).__name__}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=None if allow_pickle else True, **opts
        )
    except Exception as exc:  # truncated or corrupt weights, missing shards
        raise CLIError(
            f"cannot load the checkpoint weights in {path} (corrupt or incomplete?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return model.eval(), config


def _tokens(args: argparse.Namespace, config: Any) -> torch.Tensor:
    n = args.batch * args.seq_len
    if args.text is not None:
        from transformers import AutoTokenizer

        if not args.text.is_file():
            raise CLIError(f"text file not found: {args.text}")
        try:
            tok = AutoTokenizer.from_pretrained(args.path, local_files_only=not args.hub)
        except Exception as exc:
            raise CLIError(f"cannot load the tokenizer of {args.path}: {type(exc).__name__}: {exc}") from exc
        ids = tok(args.text.read_text(), return_tensors="pt")["input_ids"][0]
        if ids.numel() < n:
            raise CLIError(f"{args.text} gives {ids.numel()} tokens, fewer than --batch x --seq-len = {n}")
        return ids[:n].reshape(args.batch, args.seq_len)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise CLIError("the config has no vocab_size: pass --text")
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)


def _positions(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise CLIError(f"--positions takes a count or 'all', got {text!r}") from None
    if value < 1:
        raise CLIError(f"--positions must be >= 1, got {value}")
    return value


def _delimiter_id(args: argparse.Namespace) -> int:
    text = args.delimiter
    if text.startswith("id:"):
        try:
            return int(text[3:])
        except ValueError:
            raise CLIError(f"--delimiter id:N takes an integer, got {text!r}") from None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.path, local_files_only=not args.hub)
    except Exception as exc:
        raise CLIError(
            f"--delimiter {text!r} needs the checkpoint's tokenizer ({exc}); or pass id:N"
        ) from exc
    if text in getattr(tok, "all_special_tokens", []) or text in tok.get_vocab():
        return int(tok.convert_tokens_to_ids(text))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CLIError(f"--delimiter {text!r} is {len(ids)} tokens for this tokenizer, not one; pass id:N")
    return int(ids[0])


def _run_delimiter(args: argparse.Namespace, model: Any, ids: torch.Tensor) -> dict[str, Any]:
    from ess_train.analysis.delimiter import delimiter_figure, delimiter_study

    study = delimiter_study(model, ids, _delimiter_id(args), window=args.window, check=not args.no_check)
    print(
        f"delimiter {study.delimiter_id}: {len(study.occurrences)} occurrence(s); ESS at offsets -1, 0, +1:"
    )
    mid = args.window
    for name, entry in study.layers.items():
        ent = entry["entropy_ess"][mid - 1 : mid + 2]
        tol = entry["tolerance_ess"][mid - 1 : mid + 2] if entry["tolerance_ess"] else []
        print(
            f"  {name:<34} {entry['kind']:<24} entropy {' '.join(f'{v:.3f}' for v in ent)}  "
            f"tolerance {' '.join(f'{v:.3f}' for v in tol)}"
        )
    if args.plots is not None:
        from ess_train.plots import save_figure

        args.plots.mkdir(parents=True, exist_ok=True)
        print(f"wrote {save_figure(delimiter_figure(study), args.plots / 'ess_delimiter.png')}")
    return study.to_dict()


def _device(name: str) -> torch.device:
    """``--device``, refused with one line where this machine has no such device."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, analyze, write; returns the report's dict."""
    from ess_train.analysis.report import analyze
    from ess_train.measure.layers import find_layers

    if args.seq_len < 2 or args.batch < 1:
        raise CLIError("--seq-len must be >= 2 and --batch >= 1")
    positions = _positions(args.positions)
    model, config = load_checkpoint(
        args.path,
        hub=args.hub,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        dtype=_DTYPES[args.dtype],
    )
    model.to(_device(args.device))
    ids = _tokens(args, config).to(args.device)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(find_layers(model)), desc="ESS", unit="layer", file=sys.stderr)
    try:
        report = analyze(
            model,
            ids,
            positions=positions,
            check=not args.no_check,
            progress=None if bar is None else (lambda name: (bar.set_postfix_str(name), bar.update(1))),
        )
    finally:
        if bar is not None:
            bar.close()
    print(report.table())
    print(f"total ESS {report.total_ess:.1f}  total TSS {report.total_tss}  ({report.seconds:.2f} s)")
    data = report.to_dict()
    if args.delimiter is not None:
        try:
            data["delimiter"] = _run_delimiter(args, model, ids)
        except ValueError as exc:  # no occurrence with a full window: the report still counts
            print(f"ess-analyze: delimiter study skipped: {exc}", file=sys.stderr)
            data["delimiter"] = {"skipped": str(exc)}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    if args.plots is not None:
        for path in report.plot(args.plots):
            print(f"wrote {path}")
    return data


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ess-analyze``; exit status 2 on a user error (one line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CLIError, ValueError) as exc:
        print(f"ess-analyze: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
