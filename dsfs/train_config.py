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
from reference.fp8 import SCALE_FMTS
from reference.optim import OPTIMIZERS


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters; validated on construction (`check_value`: `ConfigError` naming the field).

    ``batch_size`` sequences of ``seq_len`` tokens per micro-batch, ``grad_accum`` micro-batches per optimizer step,
    ``max_steps`` optimizer steps; learning rate: linear warmup over ``warmup_steps`` to ``lr``, then cosine to
    ``min_lr_ratio * lr`` at ``max_steps`` (`dsfs.loop.lr_at`); ``weight_decay`` (decoupled, matrices only),
    ``grad_clip`` (max global gradient norm, 0: off), ``mtp_weight`` (weight of the MTP loss), ``optimizer``
    (``"adamw"`` or ``"muon"``, `reference.optim.make_optimizer`); ``eval_every`` steps between evaluations of
    ``eval_batches`` validation batches; ``time_budget_s``: stop a session after this many seconds of training
    (``None``: no limit). ``precision`` (`PRECISIONS`): ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere),
    ``"fp32"``, ``"bf16"`` (autocast to bf16 on any device; moments in bf16) or ``"fp8"`` (DeepSeek-V3's FP8
    mixed precision, `reference.fp8_training`: FP8 GEMMs for the attention projections, MLPs and experts, the rest
    in bf16 on CUDA and fp32 elsewhere, fp32 master weights, bf16 moments); ``scale_fmt``: the FP8 scales, None
    (fp32) or ``"ue8m0"`` (powers of two), fp8 only. ``indexer_warmup_steps``: models with lightning indexers (V3.2's
    DSA, V4's CSA) train them by their KL loss (`reference.model.set_indexer_training`): the first
    ``indexer_warmup_steps`` steps are the dense warm-up (main model frozen, dense attention), the rest the sparse
    stage (LM loss plus the indexers' KL over their selection); ignored without indexers.
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
    precision: str = "auto"
    scale_fmt: str | None = None
    indexer_warmup_steps: int = 0

    def __post_init__(self):
        for k in self.fields():
            check_value(k, getattr(self, k))
        if self.scale_fmt is not None and self.precision != "fp8":
            raise ConfigError(f"scale_fmt={self.scale_fmt!r} (--scale-fmt) applies to FP8 training only (--precision "
                              f"fp8), not precision {self.precision!r}")

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
                              f"{max_position_embeddings} (lower --seq-len)")

    def to_dict(self) -> dict:
        """The fields as a plain dict (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a checkpoint stored (`to_dict`). A dict without ``"optimizer"`` (written before the field
        existed) is an AdamW run's; one without ``"precision"``/``"scale_fmt"`` ran at the default precision. Raises
        `ConfigError` for a missing or unknown field or an invalid value."""
        d = {"optimizer": "adamw", "precision": "auto", "scale_fmt": None, "indexer_warmup_steps": 0, **d}
        missing, unknown = set(cls.fields()) - set(d), set(d) - set(cls.fields())
        if missing or unknown:
            raise ConfigError(f"training config: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        return cls(**d)


PRECISIONS = ("auto", "fp32", "bf16", "fp8")
_MIN_INT = {"batch_size": 1, "seq_len": 1, "max_steps": 1, "grad_accum": 1, "eval_every": 1, "eval_batches": 1,
            "warmup_steps": 0, "indexer_warmup_steps": 0}
_FLAGS = {"time_budget_s": "--time-budget"}  # CLI flags whose name is not the field's


def flag(name: str) -> str:
    """The ``dsfs train`` option of the `TrainConfig` field ``name``: ``batch_size`` -> ``--batch-size``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def check_value(name: str, value, cli: bool = False) -> None:
    """Raise `ConfigError` when ``value`` is invalid for the `TrainConfig` field ``name``: integers ``>= 1``
    (``warmup_steps >= 0``), ``lr`` finite ``> 0``, ``min_lr_ratio`` in [0, 1], other numbers finite ``>= 0``,
    ``optimizer`` one of `reference.optim.OPTIMIZERS`, ``time_budget_s`` None or ``>= 0``. The message names the
    field (``batch_size=0: ...``), or with ``cli`` its option (``--batch-size 0: ...``, `flag`)."""
    what = f"{flag(name)} {value}" if cli else f"{name}={value!r}"
    if name in _MIN_INT:
        if not isinstance(value, int) or value < _MIN_INT[name]:
            raise ConfigError(f"{what}: expected an integer >= {_MIN_INT[name]}")
    elif name == "optimizer":
        if value not in OPTIMIZERS:
            raise ConfigError(f"{what}: expected one of {', '.join(OPTIMIZERS)}")
    elif name == "precision":
        if value not in PRECISIONS:
            raise ConfigError(f"{what}: expected one of {', '.join(PRECISIONS)}")
    elif name == "scale_fmt":
        if value not in SCALE_FMTS:
            raise ConfigError(f"{what}: expected {'' if cli else 'None or '}'ue8m0' (power-of-two FP8 scales)")
    elif name == "time_budget_s":
        if value is not None and (not isinstance(value, int | float) or not value >= 0):
            raise ConfigError(f"{what}: expected {'' if cli else 'None or '}a number of seconds >= 0")
    else:
        finite = isinstance(value, int | float) and math.isfinite(value)
        if name == "lr" and not (finite and value > 0):
            raise ConfigError(f"{what}: expected a finite number > 0")
        if name == "min_lr_ratio" and not (finite and 0 <= value <= 1):
            raise ConfigError(f"{what}: expected a number in [0, 1] (final lr / peak lr)")
        if not (finite and value >= 0):
            raise ConfigError(f"{what}: expected a finite number >= 0")
