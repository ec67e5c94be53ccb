"""`TrainConfig`: the hyperparameters of a training run (batch shape, schedule, optimizer, evaluation cadence).

Presets hold one each (`dsfs.presets.TRAIN_PRESETS`); ``dsfs train`` options override fields; checkpoints store it
as a plain dict (``trainer_state.pt``'s ``"train_config"``, `TrainConfig.to_dict`) and `TrainConfig.from_dict`
reads it back, also from checkpoints written before a field existed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dsfs.errors import ConfigError
from reference.optim import OPTIMIZERS


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters; validated on construction (`ConfigError` naming the field).

    ``batch_size`` sequences of ``seq_len`` tokens per micro-batch, ``grad_accum`` micro-batches per optimizer step,
    ``max_steps`` optimizer steps; learning rate: linear warmup over ``warmup_steps`` to ``lr``, then cosine to
    ``min_lr_ratio * lr`` at ``max_steps`` (`dsfs.loop.lr_at`); ``weight_decay`` (decoupled, matrices only),
    ``grad_clip`` (max global gradient norm, 0: off), ``mtp_weight`` (weight of the MTP loss), ``optimizer``
    (``"adamw"`` or ``"muon"``, `reference.optim.make_optimizer`); ``eval_every`` steps between evaluations of
    ``eval_batches`` validation batches; ``time_budget_s``: stop a session after this many seconds of training
    (``None``: no limit).
    """

    batch_size: int
    seq_len: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int
    time_budget_s: float | None
    weight_decay: float
    grad_clip: float
    grad_accum: int
    eval_every: int
    eval_batches: int
    mtp_weight: float
    optimizer: str

    def __post_init__(self):
        ints = {"batch_size": 1, "seq_len": 1, "max_steps": 1, "grad_accum": 1, "eval_every": 1, "eval_batches": 1,
                "warmup_steps": 0}
        for k, lo in ints.items():
            v = getattr(self, k)
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"{k}={v!r}: expected an integer >= {lo}")
        for k in ("lr", "weight_decay", "grad_clip", "mtp_weight", "min_lr_ratio"):
            v = getattr(self, k)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{k}={v!r}: expected a finite number >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: expected > 0")
        b = self.time_budget_s
        if b is not None and (not isinstance(b, int | float) or not b >= 0):
            raise ConfigError(f"time_budget_s={b!r}: expected None or a number of seconds >= 0")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides) -> TrainConfig:
        """A copy with ``overrides`` applied (``None`` values are ignored), validated. Raises ``TypeError`` for an
        unknown field name and `ConfigError` for an invalid value."""
        unknown = set(overrides) - set(self.fields())
        if unknown:
            raise TypeError(f"unknown training fields {sorted(unknown)} (known: {', '.join(self.fields())})")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def check_model(self, max_position_embeddings: int) -> None:
        """Raise `ConfigError` when ``seq_len`` exceeds the model's ``max_position_embeddings``."""
        if self.seq_len > max_position_embeddings:
            raise ConfigError(f"seq_len={self.seq_len} exceeds the model's max_position_embeddings="
                              f"{max_position_embeddings}")

    def to_dict(self) -> dict:
        """The fields as a plain dict (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a checkpoint stored (`to_dict`). A dict without ``"optimizer"`` (written before the field
        existed) is an AdamW run's. Raises `ConfigError` for a missing or unknown field or an invalid value."""
        d = {"optimizer": "adamw", **d}
        missing, unknown = set(cls.fields()) - set(d), set(d) - set(cls.fields())
        if missing or unknown:
            raise ConfigError(f"training config: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        return cls(**d)
