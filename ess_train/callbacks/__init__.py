"""Lightning callbacks that use effective state-size (ESS) during training.

- :class:`ESSMonitor`: logs ESS of every protocol layer on a fixed probe batch.
- :class:`ESSRegularizer`: adds a differentiable ESS penalty to the training loss.
- :class:`ESSInitializer`: picks each layer's init hyperparameters by the ESS they give.

They work with any LightningModule whose layers implement the operator protocol
(``ess_train.models.protocol``) and with unmodified Hugging Face layers of the adapted classes; layers
are found by ``ess_train.measure.find_layers(pl_module, include, exclude)``.
What they measure is computed by ``ess_train.measure`` (``ess_penalty`` and ``ESSWarning`` come from there).
"""

from ess_train.callbacks.initializer import ESSInitializer
from ess_train.callbacks.monitor import ESSMonitor
from ess_train.callbacks.regularizer import ESSRegularizer
from ess_train.measure import ESSWarning, ess_penalty

__all__ = ["ESSMonitor", "ESSRegularizer", "ESSInitializer", "ESSWarning", "ess_penalty"]
