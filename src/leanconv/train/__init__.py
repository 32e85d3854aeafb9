"""Training, evaluation and fine-tuning: one loop, resumable, deterministic per seed.

* :mod:`.loop`: ``fit`` (SGD, cosine or step schedule, resumable per epoch, data-parallel
  under ``torchrun``), ``evaluate``, ``TrainConfig``;
* :mod:`.finetune`: ``finetune`` (every compression path fine-tunes through it) and the
  BatchNorm re-estimation ``recalibrate_bn`` / ``recalibrate_on_training_data``;
* :mod:`.distill`: knowledge distillation from a teacher (``Distillation``, a ``loop.Loss``);
* :mod:`.regularize`: group-lasso training on the pruning engine's channel groups
  (``GroupLasso``, ``regularize``), imported on use (it traces models with torch-pruning);
* :mod:`.distributed`: process-group helpers for ``torchrun``.
"""

from leanconv.train.finetune import finetune, recalibrate_bn, recalibrate_on_training_data
from leanconv.train.loop import Loader, Loss, TrainConfig, TrainResult, evaluate, fit, learning_rate

__all__ = ["TrainConfig", "TrainResult", "Loader", "Loss", "fit", "evaluate", "learning_rate", "finetune",
           "recalibrate_bn", "recalibrate_on_training_data"]
