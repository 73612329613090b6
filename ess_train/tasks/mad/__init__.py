"""The MAD suite (athms/mad-lab, ``mad/data/instances.py``), vectorized and seeded.

Label convention (all tasks, train and test alike): ``labels[t]`` is what the model must output at
position ``t`` after reading ``inputs[:t + 1]``; -100 elsewhere. MAD trained its recall tasks on
next-token targets of the whole row and tested on answer positions only; here both splits score
the answer positions only (the "confusing label format" fix).

Deliberate differences from MAD, each fixing a problem its users met:
- every draw comes from a seeded ``torch.Generator`` (MAD's selective copying used the unseeded
  global ``np.random``);
- noisy recall/memorization: one real pair is always kept; the final recall query always asks a key
  that occurred earlier (MAD's fuzzy recall could emit an unanswerable final query);
- compression: MAD returned the un-noised row as target; noise positions are now -100. MAD's
  compression used an encoder-decoder; here it is causal (see ``generate_compression``);
- selective copying: tokens sit at uniformly random prefix positions (MAD's insertion never put a
  blank after the last token);
- memorization: MAD silently set k/v motif sizes to 1; they are simply not parameters here.

One task per module: :mod:`.in_context_recall` (plain and noisy), :mod:`.fuzzy_in_context_recall`,
:mod:`.selective_copying`, :mod:`.compression`, :mod:`.memorization`; shared parts in :mod:`.base`.
"""

from __future__ import annotations

from .base import recall_vocab
from .compression import CompressionConfig, CompressionDataModule, generate_compression
from .fuzzy_in_context_recall import (
    FuzzyInContextRecallConfig,
    FuzzyInContextRecallDataModule,
    generate_fuzzy_in_context_recall,
)
from .in_context_recall import (
    InContextRecallConfig,
    InContextRecallDataModule,
    NoisyInContextRecallConfig,
    NoisyInContextRecallDataModule,
    generate_in_context_recall,
)
from .memorization import (
    MemorizationConfig,
    MemorizationDataModule,
    generate_memorization,
    make_memorization_map,
)
from .selective_copying import SelectiveCopyingConfig, SelectiveCopyingDataModule, generate_selective_copying

__all__ = [
    "CompressionConfig",
    "CompressionDataModule",
    "FuzzyInContextRecallConfig",
    "FuzzyInContextRecallDataModule",
    "InContextRecallConfig",
    "InContextRecallDataModule",
    "MemorizationConfig",
    "MemorizationDataModule",
    "NoisyInContextRecallConfig",
    "NoisyInContextRecallDataModule",
    "SelectiveCopyingConfig",
    "SelectiveCopyingDataModule",
    "generate_compression",
    "generate_fuzzy_in_context_recall",
    "generate_in_context_recall",
    "generate_memorization",
    "generate_selective_copying",
    "make_memorization_map",
    "recall_vocab",
]
