"""Cost of ``ess_train.analyze`` on tiny random Hugging Face models (nothing downloaded).

For a tiny Llama (2 layers, 4 query heads, 2 key/value heads, head dim 16) and a tiny Mamba (2 layers,
d_inner 128, N 16), at L = 256 and 1024, batch 1, with 16 positions and all positions, prints the time of
``analyze`` (forward, capture, exactness check and ESS), of the plain forward, and of a forward under
capture only (operators recorded and, at this first capture, checked; no ESS). Dense attention ESS at
all positions is quartic in L: at
L = 1024 it is measured on one query head of one layer (``include=``, ``max_operators=1``) and
extrapolated to all heads and layers (marked ``extrapolated``). Timings: best of ``--repeats``.

    python benchmarks/bench_analyze.py            # the full table
    python benchmarks/bench_analyze.py --quick    # L = 64 and 128 only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ess_train  # noqa: E402
from benchmarks.timing import best_of  # noqa: E402
from ess_train.measure.layers import find_layers
from ess_train.models.protocol import capture_operators


def tiny(family: str, max_len: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_len,
        )
    else:
        cfg = tf.MambaConfig(vocab_size=256, hidden_size=64, state_size=16, num_hidden_layers=2)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


best = best_of  # best of ``repeats`` (benchmarks/timing.py)


def row(family: str, L: int, positions: object, repeats: int) -> dict[str, object]:
    model = tiny(family, max_len=max(L, 128))
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(1))
    layers = find_layers(model)
    ess_train.analyze(model, ids[:, :32], positions=4)  # warm-up (first calls, lazy imports)
    with torch.no_grad():
        forward = best(lambda: model(ids, use_cache=False), repeats)

        def captured() -> None:
            with capture_operators(find_layers(model)):  # fresh layers: the first-capture check included
                model(ids, use_cache=False)

        capture = best(captured, repeats)
    note = ""
    if family == "llama" and positions == "all" and L > 256:
        first = next(iter(layers))
        heads = layers[first].num_heads
        part = best(
            lambda: ess_train.analyze(model, ids, positions="all", include=[first], max_operators=1), 1
        )
        seconds = part * heads * len(layers)
        note = f"extrapolated: 1 head of 1 layer took {part:.1f} s, x {heads} heads x {len(layers)} layers"
    else:
        seconds = best(lambda: ess_train.analyze(model, ids, positions=positions), repeats)
    return {
        "model": family,
        "L": L,
        "positions": positions,
        "analyze": seconds,
        "forward": forward,
        "capture": capture,
        "note": note,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L = 64 and 128 only, one repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = (64, 128) if args.quick else (256, 1024)
    repeats = 1 if args.quick else args.repeats
    rows = [row(fam, L, pos, repeats) for fam in ("llama", "mamba") for L in lengths for pos in (16, "all")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, 2 layers")
    print("| model | L | positions | analyze (s) | forward (s) | forward + capture + check (s) | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['L']} | {r['positions']} | {r['analyze']:.3f} | {r['forward']:.4f} | "
            f"{r['capture']:.4f} | {r['note']} |"
        )


if __name__ == "__main__":
    main()
