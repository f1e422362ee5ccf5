"""The config tree: nested dataclasses for optimizer, schedule, training, checkpoint, logging, job.

No torch import here: the CLI, presets and validation run in a bare interpreter. Every field
carries a docstring (the string under it); the CLI turns those into ``--help`` text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_mimo.config.io import CheckpointConfig, LoggingConfig
from megatron_mimo.config.layout import (
    ALL_BRANCHES,
    AUDIO,
    IMAGES,
    LANGUAGE,
    BranchSpec,
    ParallelismConfig,
    check_batch_split,
    check_layout,
)
from megatron_mimo.config.models import AudioModelConfig, ImagesModelConfig, LanguageModelConfig
from megatron_mimo.config.precision import PrecisionConfig
from megatron_mimo.errors import require as _require
from megatron_mimo.errors import require_positive as _require_positive

DECAY_STYLES = ("constant", "linear", "cosine")
FREEZE_FLAGS = {IMAGES: ("freeze_vit", "freeze_projection"), AUDIO: ("freeze_audio",),
                LANGUAGE: ("freeze_lm",)}
"""The --freeze-* fields that freeze each branch's parts."""


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings; the images branch may have its own learning rate."""

    lr: float = 1e-3
    """Peak learning rate of the language branch (and of the images branch unless --encoder-lr)."""
    min_lr: float = 1e-4
    """Learning rate at the end of decay."""
    images_lr: float | None = None
    """Peak learning rate of the images branch; None = same as --lr."""
    images_min_lr: float | None = None
    """Final learning rate of the images branch; None = same as --min-lr."""
    audio_lr: float | None = None
    """Peak learning rate of the audio branch; None = same as --lr."""
    audio_min_lr: float | None = None
    """Final learning rate of the audio branch; None = same as --min-lr."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip over both branches (0 disables)."""

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad"):
            _require(getattr(self, name) >= 0, f"optimizer.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.min_lr <= self.lr, f"optimizer.min_lr {self.min_lr} must be <= lr {self.lr}")
        _require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
                 f"optimizer betas must lie in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")

    def branch_lr(self, branch: str) -> tuple[float, float]:
        """(peak, final) learning rate of a branch."""
        own = {IMAGES: (self.images_lr, self.images_min_lr),
               AUDIO: (self.audio_lr, self.audio_min_lr)}.get(branch, (None, None))
        return (self.lr if own[0] is None else own[0],
                self.min_lr if own[1] is None else own[1])


@dataclass(frozen=True)
class SchedulerConfig:
    """Learning-rate schedule shared by both branches' OptimizerParamSchedulers."""

    lr_warmup_iters: int = 0
    """Iterations of linear warmup from 0."""
    lr_decay_iters: int | None = None
    """Iterations over which to decay; None = --train-iters."""
    lr_decay_style: str = "cosine"
    """Decay style: constant, linear or cosine."""

    def __post_init__(self) -> None:
        _require(self.lr_decay_style in DECAY_STYLES,
                 f"scheduler.lr_decay_style must be one of {DECAY_STYLES}, got {self.lr_decay_style!r}")
        _require(self.lr_warmup_iters >= 0, f"scheduler.lr_warmup_iters must be >= 0, got {self.lr_warmup_iters}")


@dataclass(frozen=True)
class TrainingConfig:
    """Batch sizes, length of the run and evaluation cadence."""

    micro_batch_size: int = 2
    """Samples per micro-batch on one language DP rank."""
    global_batch_size: int = 4
    """Samples per iteration over the whole job."""
    train_iters: int = 30
    """Iterations to train."""
    seed: int = 1234
    """Random seed (weights, data, dropout)."""
    eval_interval: int = 0
    """Run evaluation every N iterations (0 disables)."""
    eval_iters: int = 2
    """Batches per evaluation."""
    exit_interval: int | None = None
    """Stop after the iteration that is a multiple of N."""
    exit_duration_in_mins: float | None = None
    """Stop (saving a checkpoint with --save) once this many minutes have passed since start."""
    freeze_vit: bool = False
    """Freeze the vision encoder (LLaVA stage 1 and 2): its weights never change, it runs in eval
    mode, its optimizer holds none of them."""
    freeze_projection: bool = False
    """Freeze the projector between vision encoder and language model."""
    freeze_lm: bool = False
    """Freeze the language model (LLaVA stage 1); it still passes gradients back to the projector."""
    freeze_audio: bool = False
    """Freeze the audio encoder and its projector (with an audio branch)."""

    def __post_init__(self) -> None:
        _require_positive("training", micro_batch_size=self.micro_batch_size,
                          global_batch_size=self.global_batch_size, train_iters=self.train_iters)
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 f"training.global_batch_size {self.global_batch_size} must divide by micro_batch_size {self.micro_batch_size}")
        _require(self.eval_interval >= 0, f"training.eval_interval must be >= 0, got {self.eval_interval}")


@dataclass(frozen=True)
class DataConfig:
    """Where training samples come from (no --data-path: deterministic mock samples)."""

    data_path: str | None = None
    """Energon dataset folder of image-caption samples (e.g. from `megatron-mimo data prepare-digits`)."""
    tokenizer_model: str | None = None
    """Folder of a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json) that tokenizes
    the --data-path captions instead of the dataset's word list; its '<image>' id must be
    --image-token-id."""
    num_workers: int = 0
    """Energon worker processes per reader (0 = read in the training process)."""
    blank_images: bool = False
    """Feed all-zero images (ablation: the captions must then be guessed without the image)."""
    blank_audio: bool = False
    """Feed the features of silence instead of every clip (ablation: the words the clips decide
    must then be guessed without them; with an audio branch)."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(self.tokenizer_model is None or self.data_path is not None,
                 "data.tokenizer_model tokenizes the captions of data.data_path: give both (mock "
                 "samples have no captions)")


@dataclass(frozen=True)
class MimoConfig:
    """The whole job: both branches' layout and models, optimizer, schedule, training, I/O."""

    images_parallel: ParallelismConfig = field(default_factory=ParallelismConfig)
    """Layout of the images branch."""
    language_parallel: ParallelismConfig = field(default_factory=lambda: ParallelismConfig(offset=1))
    """Layout of the language branch."""
    audio_parallel: ParallelismConfig | None = None
    """Layout of the audio branch; None = the job has no audio branch."""
    images: ImagesModelConfig = field(default_factory=ImagesModelConfig)
    """Image encoder model."""
    audio: AudioModelConfig = field(default_factory=AudioModelConfig)
    """Audio encoder model (used with an audio branch)."""
    language: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    """Language model."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Training loop."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Model precision and the fp16 loss scaler."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    name: str = "custom"
    """Preset the config started from."""

    def __post_init__(self) -> None:
        _require(self.images_parallel.pp == 1,
                 f"the images branch supports pp=1 only, got --encoder-pp {self.images_parallel.pp}")
        _require(self.audio_parallel is None or self.audio_parallel.pp == 1,
                 "the audio branch supports pp=1 only, got --audio-pp "
                 f"{self.audio_parallel and self.audio_parallel.pp}")
        specs = self.branch_specs()
        check_layout(specs, self.world_size)
        check_batch_split(specs, self.training.global_batch_size, self.job_micro_batch)
        _require(not self.data.blank_audio or AUDIO in self.branches,
                 "data.blank_audio replaces the clips of the audio branch, but the job has no "
                 "audio branch: drop the flag")
        frozen = [f"training.{flag}" for branch in self.branches for flag in FREEZE_FLAGS[branch]]
        _require(not all(getattr(self.training, name.split(".")[1]) for name in frozen),
                 f"{', '.join(frozen[:-1])} and {frozen[-1]} together leave nothing to "
                 f"train: drop one of them")
        _require(not (self.training.freeze_lm and self.precision.fp16),
                 "training.freeze_lm with --fp16: the frozen language branch has no optimizer, "
                 "hence no loss scaler to scale its loss by; train it in --bf16")
        self._validate_model_split()
        self._validate_pipeline_split()

    @property
    def branches(self) -> tuple[str, ...]:
        """This job's branches in group-building order: images, (audio,) language."""
        return tuple(b for b in ALL_BRANCHES if b != AUDIO or self.audio_parallel is not None)

    @property
    def encoders(self) -> tuple[str, ...]:
        """The branches that feed the language model."""
        return tuple(b for b in self.branches if b != LANGUAGE)

    def parallel(self, branch: str) -> ParallelismConfig:
        """Layout of a branch by name."""
        layout = {IMAGES: self.images_parallel, AUDIO: self.audio_parallel,
                  LANGUAGE: self.language_parallel}[branch]
        if layout is None:
            raise KeyError(f"this job has no {branch} branch")
        return layout

    def branch_specs(self) -> list[BranchSpec]:
        """Every branch as a BranchSpec, in :attr:`branches` order (the order every rank
        builds groups in)."""
        return [self.parallel(name).spec(name) for name in self.branches]

    @property
    def world_size(self) -> int:
        """Ranks the job needs: both branches side by side."""
        return max(s.rank_offset + s.num_ranks for s in self.branch_specs())

    @property
    def job_micro_batch(self) -> int:
        """Samples one micro-step consumes job-wide: micro_batch_size x language dp."""
        return self.training.micro_batch_size * self.language_parallel.dp

    @property
    def num_microbatches(self) -> int:
        """Micro-steps per iteration (gradient accumulation)."""
        return self.training.global_batch_size // self.job_micro_batch

    def branch_micro_batch(self, branch: str) -> int:
        """Samples per micro-step on one DP rank of ``branch``."""
        return self.job_micro_batch // self.parallel(branch).dp

    def model(self, branch: str):
        """Model section of a branch by name."""
        return {IMAGES: self.images, AUDIO: self.audio, LANGUAGE: self.language}[branch]

    @property
    def audio_model(self) -> AudioModelConfig | None:
        """The audio encoder's section when the job has an audio branch, else None."""
        return self.audio if AUDIO in self.branches else None

    @property
    def media_tokens(self) -> int:
        """Placeholder tokens every sample holds: its image's, and its clip's with audio."""
        audio = self.audio_model
        return self.images.num_image_tokens + (audio.num_audio_tokens if audio else 0)

    def _validate_model_split(self) -> None:
        for branch in self.branches:
            model, tp = self.model(branch), self.parallel(branch).tp
            _require(model.num_attention_heads % tp == 0, (
                f"{branch} branch: num_attention_heads {model.num_attention_heads} must divide by tp {tp}"))
            _require(model.ffn_hidden_size % tp == 0, (
                f"{branch} branch: ffn_hidden_size {model.ffn_hidden_size} must divide by tp {tp}"))
        _require(self.language.seq_length > self.media_tokens + 1, (
            f"language.seq_length {self.language.seq_length} must exceed the image and audio "
            f"tokens per sample + 1 ({self.media_tokens + 1})"))
        _require(AUDIO not in self.branches
                 or self.language.audio_token_id != self.language.image_token_id,
                 f"language.audio_token and language.image_token are both "
                 f"{self.language.image_token_id}: audio and image slots need their own ids")
        _require(self.language.query_groups % self.language_parallel.tp == 0, (
            f"language.num_query_groups {self.language.query_groups} must divide by "
            f"language_parallel.tp {self.language_parallel.tp} (each TP rank holds whole "
            f"key/value heads)"))
        if self.language.kind == "mamba_hybrid":
            tp = self.language_parallel.tp
            _require(self.language.mamba_num_groups % tp == 0 and self.language.mamba_num_heads % tp == 0,
                     f"language branch: mamba_num_groups {self.language.mamba_num_groups} and mamba "
                     f"heads {self.language.mamba_num_heads} must divide by tp {tp}")

    def _validate_pipeline_split(self) -> None:
        """Language stages: equal layer counts, and at least one micro-batch per stage (else
        1F1B never reaches its steady state and the stages idle)."""
        pp = self.language_parallel.pp
        if pp == 1:
            return
        _require(self.language.untie_embeddings_and_output_weights, (
            f"--llm-pp {pp}: the output layer shares the word embeddings, which live on another "
            f"stage; add --untie-embeddings-and-output-weights"))
        layers = self.language.num_layers
        what = f"num_layers {layers}"
        if self.language.kind == "mamba_hybrid":
            what = f"hybrid_pattern {self.language.hybrid_pattern!r} ({layers} layers)"
        _require(layers % pp == 0, (
            f"language branch: {what} cannot be split over --llm-pp {pp} stages "
            f"(needs a multiple of {pp} layers)"))
        _require(self.num_microbatches >= pp, (
            f"--llm-pp {pp} needs at least {pp} micro-batches per iteration, got "
            f"{self.num_microbatches} (--global-batch-size {self.training.global_batch_size} / "
            f"(--micro-batch-size {self.training.micro_batch_size} x --llm-dp "
            f"{self.language_parallel.dp}))"))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for logs and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MimoConfig:
        """Inverse of :meth:`to_dict`."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            section_type = SECTION_TYPES.get(f.name)
            kwargs[f.name] = section_type(**value) if section_type and value is not None else value
        return cls(**kwargs)


SECTION_TYPES: dict[str, type] = {
    "images_parallel": ParallelismConfig,
    "language_parallel": ParallelismConfig,
    "audio_parallel": ParallelismConfig,
    "images": ImagesModelConfig,
    "audio": AudioModelConfig,
    "language": LanguageModelConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "training": TrainingConfig,
    "precision": PrecisionConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
