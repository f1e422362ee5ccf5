"""The job's configuration: dataclass tree, model sections, layout, presets, flags (no torch)."""

from megatron_mimo.config.layout import (
    AUDIO,
    BRANCHES,
    IMAGES,
    LANGUAGE,
    BranchSpec,
    ParallelismConfig,
)
from megatron_mimo.config.models import (
    AudioModelConfig,
    ImagesModelConfig,
    LanguageModelConfig,
    TransformerSizes,
)
from megatron_mimo.config.precision import PrecisionConfig
from megatron_mimo.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    MimoConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)

__all__ = [
    "AUDIO", "AudioModelConfig", "BRANCHES", "IMAGES", "LANGUAGE", "BranchSpec", "CheckpointConfig", "DataConfig",
    "ImagesModelConfig", "LanguageModelConfig", "LoggingConfig", "MimoConfig", "OptimizerConfig",
    "ParallelismConfig", "PrecisionConfig",
    "SchedulerConfig", "TrainingConfig", "TransformerSizes",
]
