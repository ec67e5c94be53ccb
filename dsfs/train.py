"""Pretraining behind ``dsfs train``: the model (a preset's, a resumed checkpoint's, or any checkpoint's weights with
``init_from``), the data (packed token shards of ``dsfs prepare``) and the training config, handed to the one
training loop (`dsfs.loop.TrainingRun`, which writes metrics.jsonl, loss.png, checkpoints and final/).

Its parts have their own homes: the backend (`dsfs.backend`), the trainers (`dsfs.trainer`: ``TorchTrainer``,
and ``runtime_mlx.train.MLXTrainer`` for ``--backend mlx``), the optimizer groups (`reference.optim`), the
training config (`dsfs.train_config`), the validation windows and loss (`dsfs.evaluation`).

On CPU a run that is stopped (Ctrl-C, ``time_budget_s``) and resumed gives the same losses, bit for bit, as an
uninterrupted one: the checkpoint holds the weights (with the MoE correction biases), the optimizer state, the
step, the data generator state and the RNG states. Checkpoints store the optimizer state in the reference
optimizer's layout, so a run continues on another backend.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from dsfs import data as data_mod
from dsfs.backend import Backend, resolve_backend
from dsfs.checkpointing import (
    CHECKPOINTS,
    checkpoint_problem,
    latest_checkpoint,
    load_model_dir,
    load_trainer_state,
    resolve_model_dir,
)
from dsfs.errors import CheckpointError, ConfigError, DataError
from dsfs.evaluation import Batch, eval_batches
from dsfs.loop import LocalCheckpoints, Progress, TrainingRun, check_out
from dsfs.parallel.checkpoint import is_sharded, load_sharded
from dsfs.parallel.layout import DEGREES
from dsfs.parallel.trainer import ParallelTrainer, ShardedCheckpoints
from dsfs.presets import MODEL_PRESETS, TRAIN_PRESETS
from dsfs.train_config import TrainConfig
from dsfs.trainer import make_trainer
from reference import Model, ModelConfig, V4Config
from reference.config import config_from_json

STATE_KEYS = {"step", "tokens", "elapsed_s", "optimizer", "rng_cpu", "data_generator", "train_config", "preset",
              "model_overrides", "seed", "data_dir", "meta_sha256"}


def model_config(preset: str, meta: dict, overrides: dict | None = None) -> ModelConfig:
    """``MODEL_PRESETS[preset]`` updated with ``overrides``, with ``vocab_size`` and the bos/eos/pad ids of the
    prepared data's ``meta``. Raises `ConfigError` for an unknown preset or an invalid configuration."""
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (expected one of {', '.join(MODEL_PRESETS)})")
    d = {**MODEL_PRESETS[preset], **(overrides or {}), "vocab_size": meta["vocab_size"],
         "bos_token_id": meta["bos_id"], "eos_token_id": meta["eos_id"], "pad_token_id": meta["pad_id"]}
    try:
        return V4Config(**d) if d.get("model_type") == "deepseek_v4" else ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"preset {preset}: {e}") from e


def init_config(base: ModelConfig, meta: dict, overrides: dict | None = None) -> ModelConfig:
    """The model config of a run started from a checkpoint whose config is ``base``: ``base`` with ``overrides``
    (``ModelConfig`` fields, e.g. ``num_nextn_predict_layers``) and the bos/eos/pad ids of the data's ``meta``
    (the run writes the data's tokenizer into its checkpoints, so their configs name its ids); ``vocab_size``
    stays the checkpoint's. Raises `ConfigError` for an invalid value."""
    try:
        return dataclasses.replace(base, **(overrides or {}), bos_token_id=meta["bos_id"],
                                   eos_token_id=meta["eos_id"], pad_token_id=meta["pad_id"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model config of the checkpoint: {e}") from e


def check_init_data(model_dir: Path, cfg: ModelConfig, data_dir: Path, meta: dict) -> None:
    """Raise `DataError` when the data cannot train the checkpoint in ``model_dir``: the data's vocab is larger
    than the model's ``vocab_size``, or ``model_dir`` holds a ``tokenizer.json`` other than the data's."""
    if meta["vocab_size"] > cfg.vocab_size:
        raise DataError(f"the data in {data_dir} has a vocab of {meta['vocab_size']} tokens; the model in "
                        f"{model_dir} has vocab_size {cfg.vocab_size} (expected >= the data's)")
    mine, theirs = model_dir / "tokenizer.json", data_dir / meta.get("tokenizer", "tokenizer.json")
    if mine.is_file():
        data_mod.read_tokenizer(mine)  # an unreadable one is not a mismatch
    if mine.is_file() and data_mod.file_sha256(mine) != data_mod.file_sha256(theirs):
        raise DataError(f"tokenizer mismatch: {mine} differs from {theirs}; prepare the data with the checkpoint's "
                        f"tokenizer, or start from a checkpoint without one")


def load_init_model(cls: type, model_dir: Path, meta: dict, overrides: dict | None, say: Callable[[str], None]):
    """The weights of the checkpoint ``model_dir`` in a fresh model of the torch class ``cls`` (the reference API),
    for ``init_from``: in train mode, with the config of `init_config`.

    MTP depths that config.json asks for and the files lack are initialized fresh from the current torch RNG
    (``missing_mtp="init"``); with ``overrides["num_nextn_predict_layers"]`` the model has that many depths: the
    files' first ones, the rest fresh. ``say`` gets one line per depth initialized fresh or dropped, and one when
    the bos/eos ids change. Raises `CheckpointError` when the checkpoint cannot be loaded."""
    depths = (overrides or {}).get("num_nextn_predict_layers")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            src = cls.from_pretrained(model_dir, missing_mtp="init" if depths is None else "drop")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}") from e
    for w in caught:
        say(f"init from {model_dir}: {w.message}")
    cfg = init_config(src.config, meta, overrides)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    if any(getattr(cfg, k) != getattr(src.config, k) for k in ids):
        say(f"init from {model_dir}: bos/eos/pad ids {[getattr(src.config, k) for k in ids]} -> the data's "
            f"{[getattr(cfg, k) for k in ids]}")
    if cfg == src.config:
        return src.train()
    model = cls.for_config(cfg)
    held = src.config.num_nextn_predict_layers
    keep = {k: v for k, v in src.state_dict().items()
            if not (k.startswith("mtp.") and int(k.split(".")[1]) >= cfg.num_nextn_predict_layers)}
    res = model.load_state_dict(keep, strict=False)
    fresh = tuple(f"mtp.{k}." for k in range(held, cfg.num_nextn_predict_layers))
    if res.unexpected_keys or any(not k.startswith(fresh) for k in res.missing_keys):
        raise RuntimeError(f"init from {model_dir}: weights do not fit the model ({res})")  # a bug, not bad input
    if cfg.num_nextn_predict_layers > held:
        say(f"init from {model_dir}: MTP depths {list(range(held, cfg.num_nextn_predict_layers))} initialized fresh")
    elif cfg.num_nextn_predict_layers < held:
        say(f"init from {model_dir}: MTP depths {list(range(cfg.num_nextn_predict_layers, held))} dropped")
    return model.train()


def _config_diff(have: ModelConfig, want: ModelConfig) -> list[str]:
    a, b = have.to_dict(), want.to_dict()
    return [f"{k}: checkpoint {a.get(k)!r}, requested {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _resume_state(resume, out_dir, preset) -> tuple[Path, dict]:
    where = Path(resume) if resume is not True else Path(out_dir or Path("runs") / (preset or "tiny"))
    ckpt = latest_checkpoint(where)
    if ckpt is None:
        if not where.is_dir():
            raise CheckpointError(f"{where}: no checkpoint to resume (no such directory; expected a run, "
                                  f"{CHECKPOINTS} or step_* directory)")
        problem = checkpoint_problem(where) if where.name.startswith("step_") else None
        if problem is not None:
            detail = problem.removeprefix("an incomplete checkpoint: ")
            raise CheckpointError(f"{where}: no checkpoint to resume: {detail} (an incomplete checkpoint; resume "
                                  "from its run directory to take the newest complete one)")
        raise CheckpointError(f"{where}: no checkpoint to resume (expected {CHECKPOINTS}/step_* directories)")
    state = load_trainer_state(ckpt)
    missing = sorted(STATE_KEYS - set(state))
    if missing:
        raise CheckpointError(f"{ckpt}: trainer state lacks {', '.join(missing)}")
    return ckpt, state


def check_run_options(resume, overwrite: bool, keep_last: int | None, save_every: int | None) -> None:
    """Raise `ConfigError` for ``resume`` with ``overwrite``, a negative ``keep_last`` or a ``save_every`` below 1
    (every verb that writes a run directory: ``dsfs train`` and the post-training stages)."""
    if resume and overwrite:
        raise ConfigError("pass --resume (continue the run) or --overwrite (delete it and start over), not both")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 0):
        raise ConfigError(f"--keep-last {keep_last}: expected an integer >= 0 (0 keeps every checkpoint)")
    if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
        raise ConfigError(f"--save-every {save_every}: expected an integer >= 1")


def _check_splits(tc: TrainConfig, data_dir: Path, train_tokens, val_tokens) -> None:
    """Raise `DataError` when a split is shorter than one window of ``seq_len + 1`` tokens, or one optimizer step
    needs more tokens than the train split holds."""
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < tc.seq_len + 1:
            raise DataError(f"the {split} split of {data_dir} holds {data_mod.plural(len(tokens), 'token')}: too "
                            f"few for --seq-len {tc.seq_len} (expected at least {tc.seq_len + 1}); lower --seq-len "
                            "or prepare more data")
    need = tc.batch_size * tc.seq_len * tc.grad_accum
    if need > len(train_tokens):
        raise DataError(f"one step takes {need:,} tokens (--batch-size {tc.batch_size} x --seq-len {tc.seq_len} x "
                        f"--grad-accum {tc.grad_accum}), more than the {len(train_tokens):,} tokens of the train "
                        f"split of {data_dir}; lower --batch-size")


def _initial_model(be: Backend, cfg: ModelConfig, ckpt: Path | None, init_dir: Path | None, meta: dict,
                   model_overrides: dict | None, say):
    """The model a session starts from: the resumed checkpoint's (in the backend's class), the ``init_from``
    checkpoint's weights, or a fresh one of ``cfg`` drawn under the current torch RNG state (the reference model for
    the MLX runtime, converted by `make_trainer`, so every backend starts from the same weights)."""
    if ckpt is not None:
        return load_model_dir(ckpt, be.model_cls)
    cls = Model if be.name == "mlx" else be.model_cls
    if init_dir is not None:
        return load_init_model(cls, init_dir, meta, model_overrides, say)
    return cls.for_config(cfg)


def train(
    preset: str | None = None,
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool | str | os.PathLike = False,
    init_from: str | os.PathLike | None = None,
    backend: str = "auto",
    seed: int | None = None,
    keep_last: int | None = None,
    save_every: int | None = None,
    overwrite: bool = False,
    model_overrides: dict | None = None,
    verbose: bool = True,
    on_step: Callable[[dict], None] | None = None,
    compile: bool | str = "auto",
    parallel: dict | None = None,
    **overrides,
) -> dict:
    """Train a model on a prepared data directory; return a summary dict.

    The model: a fresh one of ``preset`` (default ``tiny``), or, with ``init_from`` (a model directory: ours, a
    run's ``final/`` or ``checkpoints/step_N``, a run or checkpoints directory, a transformers-saved
    ``DeepseekV3ForCausalLM`` / ``DeepseekV32ForCausalLM``), that checkpoint's weights and model config (see
    `load_init_model`; the preset then gives only the training config): a new run at step 0, with a fresh optimizer
    and data order. ``resume`` instead continues a run exactly: ``True`` for the newest checkpoint of ``out_dir``,
    or a path (step, checkpoints or run directory; without ``out_dir`` the run continues in that checkpoint's run
    directory); the preset, model and training config then default to the checkpoint's.

    ``data_dir``: a ``dsfs prepare`` output; default: the one recorded in the resumed checkpoint when it still
    exists, else ``data.prepare()`` with its defaults (skipped when already done). A fresh model takes
    ``vocab_size`` and the bos/eos/pad ids from the data's meta.json; an ``init_from`` model keeps its
    ``vocab_size`` (which must be >= the data's; a ``tokenizer.json`` beside it must be the data's) and takes the
    data's bos/eos/pad ids. ``out_dir``: the run directory (default ``runs/<preset>``); a fresh run refuses one
    that already holds a run unless ``overwrite`` (which deletes its checkpoints, final model and metrics).
    ``overrides``: `TrainConfig` fields over the preset's (``None`` values are ignored; on resume over the
    checkpoint's). ``model_overrides``: ``ModelConfig`` fields over the preset's or the ``init_from``
    checkpoint's (tests use a micro model; ``{"num_nextn_predict_layers": 0}`` trains without MTP; on resume
    merged over the checkpoint's).

    Each optimizer step consumes ``grad_accum`` batches of ``batch_size x seq_len`` tokens drawn by
    ``get_batch`` with a generator seeded by ``seed`` (default 0; on resume the checkpoint's, and another one is
    refused: the run continues the checkpoint's data order). A resume refuses a run that is finished (its step
    has reached ``max_steps``) or a ``max_steps`` below its step.

    Validation (`dsfs.evaluation.evaluate` on ``eval_batches`` fixed windows of the val split) runs at step 0 of a
    fresh run, every ``eval_every`` steps and at the end; checkpoints every ``save_every`` steps (default
    ``eval_every``), on Ctrl-C, at the end, keeping the newest ``keep_last`` (default 3; on resume both default to
    the run's). ``time_budget_s``: stop (evaluate, checkpoint, write final/) once this session has trained that many
    wall-clock seconds; the summary's ``stopped`` is then ``"time_budget"``. ``on_step``: called with each step's
    metrics record (tests). ``compile``: ``torch.compile`` the training loss (``"auto"``: on cpu and cuda, not on
    mps); on the MLX runtime, ``mx.compile`` the micro-step and the update (``"auto"``: on).

    Multi-process (a worker launched by ``dsfs train --nproc N`` or ``torchrun``: ``WORLD_SIZE`` > 1): ``parallel``
    holds the layout's degrees (`dsfs.parallel.layout.ParallelDims` fields; default: every rank fully sharded data
    parallel); the run trains with `dsfs.parallel.trainer.ParallelTrainer` (eager), every rank drawing the same
    global batches and taking its share, writes sharded checkpoints and gathers ``final/`` on rank 0. A run resumes
    under any layout or number of processes, sharded or not. With ``backend="mlx"``, a process started by
    ``mlx.launch`` or ``dsfs train --backend mlx --nproc N`` (`runtime_mlx.distributed`) trains data parallel:
    every process draws the same global batches and takes its rows (``batch_size`` must be a multiple of the
    processes), gradients averaged, rank 0 writing the run directory (`runtime_mlx.distributed.MLXCheckpoints`).

    Returns the summary of `dsfs.loop.TrainingRun.run` plus ``"backend"``. Exact resume assumes the same device and
    torch thread count in both sessions; a run continues on another backend within float tolerance. Raises
    ``TypeError`` for an unknown training field, a `dsfs.errors.UserError` for bad input: unknown preset, invalid
    values, a missing data directory, no or a corrupt checkpoint, a checkpoint whose model config or data does not
    match, an occupied ``out_dir`` or one that another process holds (`dsfs.rundir.RunDirBusy`, naming its pid), a
    backend that cannot run, a non-finite loss. Ctrl-C or SIGTERM saves a checkpoint, prints how to resume, and
    raises `dsfs.loop.Interrupted` (a KeyboardInterrupt).
    """
    if resume and init_from is not None:
        raise ConfigError("pass --resume (continue a run exactly) or --init-from (start a run from a checkpoint's "
                          "weights), not both")
    if preset is not None and preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (expected one of {', '.join(TRAIN_PRESETS)})")
    check_run_options(resume, overwrite, keep_last, save_every)
    be = resolve_backend(backend)
    mlx_group = _mlx_group(be, parallel)
    layout = _parallel_layout(be, parallel, compile, overrides.get("precision"))
    if dist_rank() != 0:
        verbose = False
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if verbose else (lambda msg: None)

    # ---- checkpoint to resume, or to start from
    state, ckpt, init_dir = None, None, None
    if resume:
        ckpt, state = _resume_state(resume, out_dir, preset)
        if preset not in (None, state["preset"]):
            raise CheckpointError(f"{ckpt} is a run of preset {state['preset']}; --preset {preset} cannot change it "
                                  "on --resume (its model and training options are the checkpoint's)")
        preset = preset or state["preset"]
        if seed not in (None, state["seed"]):
            raise CheckpointError(f"{ckpt} is a run of --seed {state['seed']}; --seed {seed} cannot change it on "
                                  "--resume (the run continues the checkpoint's data order and RNG state)")
        seed = state["seed"]
        keep_last = state.get("keep_last", 3) if keep_last is None else keep_last  # the run's, unless given
        save_every = state.get("save_every") if save_every is None else save_every
        model_overrides = {**(state["model_overrides"] or {}), **(model_overrides or {})} or None
        init_dir = Path(state["init_from"]) if state.get("init_from") else None
    elif init_from is not None:
        init_dir = resolve_model_dir(init_from)
    preset, seed, keep_last = preset or "tiny", seed or 0, 3 if keep_last is None else keep_last
    if out_dir is None and ckpt is not None and ckpt.parent.name == CHECKPOINTS:
        out = ckpt.parent.parent  # resume PATH without --out: continue in that run directory
    else:
        out = Path(out_dir or Path("runs") / preset)
    data_mod.check_out_dir(out)

    # ---- data
    if data_dir is None and state is not None:
        if not Path(state["data_dir"]).is_dir():
            raise DataError(f"{ckpt} was trained on the data in {state['data_dir']}, which no longer exists; pass "
                            "--data DIR (where that prepared data directory is now)")
        data_dir = state["data_dir"]
    if data_dir is None:
        data_dir = _prepare_once(layout, verbose, mlx_group)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory (run dsfs prepare first, or omit --data)")
    meta = data_mod.load_meta(data_dir)
    meta_sha = data_mod.file_sha256(data_dir / "meta.json")
    train_tokens = data_mod.load_tokens(data_dir, "train")
    val_tokens = data_mod.load_tokens(data_dir, "val")
    tokenizer_file = data_dir / meta.get("tokenizer", "tokenizer.json")

    # ---- configs
    if state is not None:
        tc = TrainConfig.from_dict(state["train_config"])
        if overrides.get("optimizer") not in (None, tc.optimizer):
            raise CheckpointError(f"{ckpt} was trained with optimizer {tc.optimizer}; it cannot continue with "
                                  f"{overrides['optimizer']} (its optimizer state is {tc.optimizer}'s)")
        if overrides.get("precision") not in (None, tc.precision):  # the weights and moments carry over as they are
            say(f"resuming a {tc.precision} run at --precision {overrides['precision']}")
            if overrides["precision"] != "fp8":
                tc = dataclasses.replace(tc, scale_fmt=None)  # UE8M0 scales are FP8's; replace() keeps a None
    else:
        tc = TRAIN_PRESETS[preset]
    tc = tc.replace(**overrides)
    if state is not None and state["step"] >= tc.max_steps:
        at = f"{ckpt} is at step {state['step']}"
        if tc.max_steps < state["step"]:
            raise CheckpointError(f"{at}; --max-steps {tc.max_steps} is below it (expected a --max-steps above "
                                  f"{state['step']} to train on)")
        raise CheckpointError(f"{at} of --max-steps {tc.max_steps}: the run is finished (its model is in "
                              f"{out / 'final'}); pass a --max-steps above {state['step']} to train on")
    if init_dir is not None:  # the run's own config (on resume: the checkpoint's, the init_from source may be gone)
        try:
            base = config_from_json(ckpt if ckpt is not None else init_dir)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt or init_dir}: unreadable config.json ({e})") from e
        cfg = init_config(base, meta, model_overrides)
        check_init_data(init_dir if ckpt is None else ckpt, cfg, data_dir, meta)
    else:
        cfg = model_config(preset, meta, model_overrides)
    tc.check_model(cfg.max_position_embeddings)
    _check_splits(tc, data_dir, train_tokens, val_tokens)
    if mlx_group is not None and tc.batch_size % mlx_group.size():
        raise ConfigError(f"--batch-size {tc.batch_size}: expected a multiple of the {mlx_group.size()} processes "
                          "(each takes an equal share of the rows)")
    if state is not None:
        if state["meta_sha256"] != meta_sha:
            raise CheckpointError(
                f"{ckpt} was trained on other data ({state['data_dir']}, meta.json sha256 "
                f"{state['meta_sha256'][:12]}); {data_dir} has meta.json sha256 {meta_sha[:12]}")
        try:
            have = config_from_json(ckpt)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: unreadable config.json ({e})") from e
        diff = _config_diff(have, cfg)
        if diff:
            source = f"--init-from {init_dir}" if init_dir is not None else f"preset {preset}"
            raise CheckpointError(f"{ckpt} does not match the requested model ({source}, data "
                                  f"{data_dir}): " + "; ".join(diff))
    check_out(out, fresh=state is None, overwrite=overwrite)  # early; TrainingRun.run checks again under its lock
    if mlx_group is not None:  # no process checks while rank 0 already holds the run directory
        from runtime_mlx.distributed import barrier

        barrier(mlx_group)
    if layout is not None:
        import torch.distributed as dist

        dist.barrier()

    # ---- model, optimizer, data order
    torch.manual_seed(seed)
    sharded = ckpt is not None and is_sharded(ckpt)
    model = _initial_model(be, cfg, None if sharded else ckpt, init_dir, meta, model_overrides, say)
    if layout is not None:
        trainer = ParallelTrainer(model, layout, tc)
    else:
        trainer = make_trainer(be, model, tc, compile)
    gen = torch.Generator().manual_seed(seed)
    start = None
    if state is not None:
        try:
            if sharded:
                load_sharded(ckpt, *_parts_and_optimizers(trainer))
            else:
                trainer.load_state_dict(state["optimizer"])
            gen.set_state(state["data_generator"])
            torch.set_rng_state(state["rng_cpu"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: trainer state does not fit this model ({e})") from e
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        start = Progress(state["step"], state["tokens"], state["elapsed_s"])
        seed = state["seed"]

    def next_batch() -> Batch:
        x, y = data_mod.get_batch(train_tokens, tc.batch_size, tc.seq_len, gen)
        return {"input_ids": x, "targets": y}

    def stage_state() -> dict:
        return {"data_generator": gen.get_state(), "preset": preset, "model_overrides": model_overrides or {},
                "seed": seed, "data_dir": str(data_dir.resolve()), "meta_sha256": meta_sha, "backend": be.name,
                "init_from": str(init_dir.resolve()) if init_dir is not None else None,
                "keep_last": keep_last, "save_every": save_every}

    if be.note:
        say(be.note)
    tok_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    what = f"resuming {ckpt} at step {start.step}" if start else "training"
    source = f"init from {init_dir}, " if init_dir is not None else ""
    say(f"{what}: preset {preset}, {source}{trainer.n_params / 1e6:.2f}M parameters, {be.name} backend on "
        f"{trainer.device_type}{trainer.label}; {tok_per_step:,} tokens/step ({tc.batch_size}x{tc.seq_len}x"
        f"{tc.grad_accum}), {data_mod.plural(tc.max_steps, 'step')}; data {data_dir} ({len(train_tokens):,} train "
        f"tokens); out {out}")
    if trainer.note:
        say(trainer.note)
    run = TrainingRun(trainer, tc, out, next_batch, eval_batches(val_tokens, tc.batch_size, tc.seq_len,
                      tc.eval_batches), tok_per_step, stage_state, tokenizer_file, keep_last=keep_last,
                      save_every=save_every, start=start, overwrite=overwrite, say=say, verbose=verbose,
                      desc=f"train {preset}", on_step=on_step,
                      checkpoints=_checkpoints(layout, mlx_group))
    summary = run.run()
    return {**summary, "backend": be.name}


def dist_rank() -> int:
    """This process's global rank: in the torch process group, or in the MLX launch of a data-parallel MLX run
    (`runtime_mlx.distributed.world`, once the run has imported it); 0 for one process."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank()
    if "runtime_mlx.distributed" in sys.modules:
        from runtime_mlx.distributed import rank, world

        return rank(world())
    return 0


def _mlx_group(be: Backend, parallel: dict | None):
    """The group of a data-parallel MLX run (`runtime_mlx.distributed.world`: a process started by ``mlx.launch``
    or ``dsfs train --backend mlx --nproc N``), ``None`` for one process or another backend. Raises `ConfigError`
    for parallel degrees above 1 (MLX trains data parallel only)."""
    if be.name != "mlx":
        return None
    from runtime_mlx.distributed import launched, world

    if launched() and parallel and any(v > 1 for k, v in parallel.items() if k in DEGREES and isinstance(v, int)):
        raise ConfigError("--backend mlx trains data parallel only: pass --nproc N without --dp-shard, "
                          "--dp-replicate, --cp, --tp, --pp or --ep")
    return world()


def _checkpoints(layout, mlx_group):
    """How the run saves: sharded (a torch layout), rank 0 for every MLX process (`MLXCheckpoints`), or ``None``
    (`dsfs.loop.LocalCheckpoints`)."""
    if layout is not None:
        return ShardedCheckpoints()
    if mlx_group is not None:
        from runtime_mlx.distributed import MLXCheckpoints

        return MLXCheckpoints(LocalCheckpoints(), mlx_group)
    return None


def _parallel_layout(be: Backend, parallel: dict | None, compile, precision):
    """The `dsfs.parallel.layout.Layout` of a launched worker (``WORLD_SIZE`` > 1), after joining the process group;
    ``None`` for a one-process run. Raises `ConfigError` for what a multi-process run cannot do."""
    from dsfs.parallel.launch import init_layout, launched_world_size

    if launched_world_size() == 1:
        if parallel and any(v > 1 for k, v in parallel.items() if k in DEGREES and isinstance(v, int)):
            raise ConfigError("parallel degrees above 1 need several processes: pass --nproc N (or start the run "
                              "with torchrun)")
        return None
    if be.name == "mlx":
        raise ConfigError("--backend mlx trains on several processes with --nproc N or mlx.launch (data parallel), "
                          "not under torchrun")
    if compile is True:
        raise ConfigError("--compile on: multi-process runs train eager (--compile off or auto)")
    layout = init_layout(parallel or {}, be.device.type)
    if precision == "fp8" and (layout.dims.tp > 1 or layout.dims.ep > 1 or layout.dims.pp > 1):
        raise ConfigError("--precision fp8 trains with data and context parallelism (dp-replicate, dp-shard, cp), "
                          "not with tp, ep or pp")
    return layout


def _prepare_once(layout, verbose: bool, mlx_group=None) -> Path:
    """``dsfs prepare``'s defaults (skipped when done), on rank 0 first when several processes start together (a
    torch ``layout`` or an MLX group), so they never write the same files."""
    if mlx_group is not None:
        from runtime_mlx.distributed import barrier

        if mlx_group.rank() == 0:
            out = data_mod.prepare(verbose=verbose)
            barrier(mlx_group)
            return out
        barrier(mlx_group)
        return data_mod.prepare(verbose=False)
    if layout is None:
        return data_mod.prepare(verbose=verbose)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        out = data_mod.prepare(verbose=verbose)
        dist.barrier()
        return out
    dist.barrier()
    return data_mod.prepare(verbose=False)


def _parts_and_optimizers(trainer) -> tuple[list, list]:
    """The model parts and optimizers a sharded checkpoint loads into: a `ParallelTrainer`'s, or a one-process
    trainer's model and optimizer."""
    if isinstance(trainer, ParallelTrainer):
        return trainer.parts, trainer.optimizers
    if not isinstance(trainer.model, torch.nn.Module):
        raise CheckpointError("a sharded checkpoint (several processes) resumes on the torch backends (--backend "
                              "reference or cuda); for MLX, dsfs export it and start with --init-from")
    return [trainer.model], [trainer.opt]
