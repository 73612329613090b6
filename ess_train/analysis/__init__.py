"""ESS of a whole model in one call: ``analyze(model, input_ids)`` and its report, plots, CLI, studies.

``report.py`` (:func:`analyze`, :class:`ESSReport`), ``plots.py`` (profile and utilization figures),
``cli.py`` (``ess-analyze DIR``: a local checkpoint, offline), ``delimiter.py`` (ESS aligned at delimiter
tokens). Built on :mod:`ess_train.measure` and :mod:`ess_train.adapters`; no Lightning.
"""

from ess_train.analysis.report import ESSReport, LayerReport, UnsupportedModelError, analyze, context_length

__all__ = ["analyze", "ESSReport", "LayerReport", "UnsupportedModelError", "context_length"]
