"""Config sections of what a job reads and writes: checkpoints and logs (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mimo.errors import require as _require


@dataclass(frozen=True)
class CheckpointConfig:
    """Where to save and load checkpoints and what to include (Megatron's flag names)."""

    save: str | None = None
    """Directory to save checkpoints to (a checkpoint is always written at the last iteration)."""
    load: str | None = None
    """Directory to load a checkpoint from (latest_checkpointed_iteration.txt picks it)."""
    save_interval: int | None = None
    """Save every N iterations."""
    no_save_optim: bool = False
    """Do not save optimizer state (such a checkpoint resumes only with --no-load-optim/--finetune)."""
    no_save_rng: bool = False
    """Do not save RNG state."""
    no_load_optim: bool = False
    """Do not load optimizer state: Adam moments start fresh; iteration and LR schedule continue."""
    no_load_scheduler: bool = False
    """Do not load the LR schedulers: the schedule restarts from step 0 (warmup again)."""
    no_load_rng: bool = False
    """Do not load RNG state: streams are seeded from --seed as in a new run."""
    finetune: bool = False
    """Load model weights only; iteration, data position, optimizer and schedulers start fresh."""
    pretrained_checkpoint: str | None = None
    """Checkpoint to start from when --load holds none, weights only (as --finetune): a
    fine-tuning run that resumes from --load needs no change of flags."""
    ckpt_step: int | None = None
    """Load this iteration instead of the one in latest_checkpointed_iteration.txt."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """Save optimizer state 'fully_reshardable' (resumable under another TP/DP) instead of 'dp_reshardable'."""
    ckpt_timeout_s: int = 300
    """Bound on every checkpoint collective: a rank missing for this long becomes an error naming it."""
    async_save: bool = False
    """Write checkpoint shards from a staged copy in a background thread while training
    continues; the checkpoint is published once every rank has finished writing."""
    no_ckpt_verify: bool = False
    """Skip checking every file's checksum before a load (the file-size checks still run)."""
    ckpt_keep_last: int | None = None
    """Keep only the newest K checkpoints (older ones are deleted after a newer one is published);
    None keeps all."""

    def __post_init__(self) -> None:
        _require(self.save_interval is None or self.save_interval >= 1,
                 f"checkpoint.save_interval must be >= 1, got {self.save_interval}")
        _require(self.ckpt_step is None or self.ckpt_step >= 0,
                 f"checkpoint.ckpt_step must be >= 0, got {self.ckpt_step}")
        _require(self.ckpt_timeout_s >= 1, f"checkpoint.ckpt_timeout_s must be >= 1, got {self.ckpt_timeout_s}")
        _require(self.ckpt_keep_last is None or self.ckpt_keep_last >= 1,
                 f"checkpoint.ckpt_keep_last must be >= 1, got {self.ckpt_keep_last}")

    @property
    def optimizer_sharding_type(self) -> str:
        """DistributedOptimizer checkpoint format (never megatron's rejected default)."""
        return "fully_reshardable" if self.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


@dataclass(frozen=True)
class LoggingConfig:
    """What is printed and where metrics go."""

    log_interval: int = 1
    """Print a training line every N iterations."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here (needs the 'tb' extra)."""
    log_level: str = "INFO"
    """Python logging level."""
    metrics_file: str | None = None
    """Append one JSON line per iteration (loss, grad norm, LR per branch, samples) here."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, f"logging.log_interval must be >= 1, got {self.log_interval}")
