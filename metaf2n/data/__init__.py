"""Training data of MetaF2N: image folders, face restorers, task sampling and the demo set."""

from metaf2n.data.demo import build_demo_set, default_cache_dir
from metaf2n.data.images import BackgroundFolder, FaceFolder, ImageFolder, list_images, read_image
from metaf2n.data.restorers import (
    CallableRestorer,
    FaceRestorer,
    GroundTruthRestorer,
    TorchScriptRestorer,
    as_restorer,
)
from metaf2n.data.tasks import TaskBatch, TaskConfig, TaskSampler, texture_score

__all__ = [
    "BackgroundFolder",
    "CallableRestorer",
    "FaceFolder",
    "FaceRestorer",
    "GroundTruthRestorer",
    "ImageFolder",
    "TaskBatch",
    "TaskConfig",
    "TaskSampler",
    "TorchScriptRestorer",
    "as_restorer",
    "build_demo_set",
    "default_cache_dir",
    "list_images",
    "read_image",
    "texture_score",
]
