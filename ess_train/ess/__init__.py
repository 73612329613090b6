"""The ESS engine: effective state-size of causal linear operators (torch only).

Definitions and conventions: ``shared/ESS.md`` (Parnichkun et al., ICML 2025).
"""

from ess_train.ess.operators import DenseOperator, Operator, RecurrentOperator

__all__ = ["DenseOperator", "RecurrentOperator", "Operator"]
