"""The ESS engine: effective state-size of causal linear operators (torch only).

Definitions and conventions: ``docs/ESS.md`` (Parnichkun et al., ICML 2025).
"""

from ess_train.ess.measures import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_CHUNK_ELEMENTS_ACCELERATOR,
    average_ess,
    default_rtol,
    entropy_ess,
    entropy_ess_from_singular_values,
    hankel_singular_values,
    max_ess,
    tolerance_ess,
    tolerance_ess_from_singular_values,
    tss_fraction,
)
from ess_train.ess.operators import (
    DeltaRuleOperator,
    DenseOperator,
    GatedToeplitzOperator,
    Operator,
    RecurrentOperator,
    SelectiveSSMOperator,
    ShiftRegisterOperator,
    compute_dtype,
)

__all__ = [
    "DenseOperator",
    "RecurrentOperator",
    "Operator",
    "SelectiveSSMOperator",
    "DeltaRuleOperator",
    "GatedToeplitzOperator",
    "ShiftRegisterOperator",
    "compute_dtype",
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS_ACCELERATOR",
    "hankel_singular_values",
    "entropy_ess",
    "tolerance_ess",
    "entropy_ess_from_singular_values",
    "tolerance_ess_from_singular_values",
    "default_rtol",
    "average_ess",
    "max_ess",
    "tss_fraction",
]
