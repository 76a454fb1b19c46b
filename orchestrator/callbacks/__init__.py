"""Keras-3-style callbacks that decide once for the whole cluster.

Hooks return :mod:`orchestrator.decisions` values instead of touching the model. Nothing in this
package imports torch or ray.
"""

from orchestrator.callbacks.backup_and_restore import BackupAndRestore
from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.callbacks.callback_list import CallbackList
from orchestrator.callbacks.csv_logger import CSVLogger
from orchestrator.callbacks.early_stopping import EarlyStopping
from orchestrator.callbacks.history import History
from orchestrator.callbacks.lambda_callback import LambdaCallback
from orchestrator.callbacks.learning_rate_scheduler import LearningRateScheduler
from orchestrator.callbacks.model_checkpoint import ModelCheckpoint
from orchestrator.callbacks.monitor import MonitorCallback
from orchestrator.callbacks.progbar_logger import ProgbarLogger
from orchestrator.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau
from orchestrator.callbacks.remote_monitor import RemoteMonitor
from orchestrator.callbacks.rollback_on_nan import RollbackOnNaN
from orchestrator.callbacks.tensorboard import TensorBoard
from orchestrator.callbacks.terminate_on_nan import TerminateOnNaN

__all__ = [
    "BackupAndRestore",
    "Callback",
    "CallbackList",
    "CSVLogger",
    "EarlyStopping",
    "History",
    "LambdaCallback",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "MonitorCallback",
    "ProgbarLogger",
    "ReduceLROnPlateau",
    "RemoteMonitor",
    "RollbackOnNaN",
    "TensorBoard",
    "TerminateOnNaN",
    "TrainingView",
]
