"""`stemd train`: fit a model on synthetic data generated on the fly, through one loop for every model.

`train()` (`loop`) is the pure entry point: settings in, checkpoints and a `TrainResult` out. What a model
brings (data stream, validation set, network, checkpoint metadata) is a `tasks.TrainTask`, picked by
`settings.model` from `tasks.TASKS`; `data` makes the samples, `scoring` the figures, `command` the CLI.
"""

from stemd.apps.training.command import add_arguments, command_line, run, settings_from_args
from stemd.apps.training.data import ValidationSet, reference_levels, scene_patches, stream_seed
from stemd.apps.training.loop import DEFAULT_STEP, TrainResult, load_init, lr_at, read_state, train
from stemd.apps.training.scoring import evaluate, frame_quality, quality, sample_log_mse, val_loss
from stemd.apps.training.tasks import (
    TASKS,
    ConvTask,
    TrainTask,
    WindowAETask,
    task_for,
    training_stream,
    validation_set,
)

__all__ = [
    "DEFAULT_STEP", "TASKS", "ConvTask", "TrainResult", "TrainTask", "ValidationSet", "WindowAETask",
    "add_arguments", "command_line", "evaluate", "frame_quality", "load_init", "lr_at", "quality", "read_state",
    "reference_levels", "run", "sample_log_mse", "scene_patches", "settings_from_args", "stream_seed", "task_for",
    "train", "training_stream", "val_loss", "validation_set",
]
