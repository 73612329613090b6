"""Causal linear operators ``y = T u``: the :class:`Operator` contract, its two forms and structured ones.

``DenseOperator`` holds ``T`` itself; ``RecurrentOperator`` a state-space realization (diagonal or full
transitions). Structured operators (``SelectiveSSMOperator``, ``DeltaRuleOperator``,
``GatedToeplitzOperator``, ``ShiftRegisterOperator``) are one of the two forms built from a layer's
factors. Every constructor validates its input and raises an error that names the problem.
"""

from ess_train.ess.operators.base import Operator, check_finite, compute_dtype, select_batch
from ess_train.ess.operators.dense import CAUSALITY_RTOL, DenseOperator
from ess_train.ess.operators.recurrent import RecurrentOperator
from ess_train.ess.operators.structured import (
    DeltaRuleOperator,
    GatedToeplitzOperator,
    SelectiveSSMOperator,
    ShiftRegisterOperator,
)

__all__ = [
    "Operator",
    "DenseOperator",
    "RecurrentOperator",
    "SelectiveSSMOperator",
    "DeltaRuleOperator",
    "GatedToeplitzOperator",
    "ShiftRegisterOperator",
    "CAUSALITY_RTOL",
    "compute_dtype",
    "check_finite",
    "select_batch",
]
