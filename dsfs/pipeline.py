"""``dsfs pipeline --config FILE.toml``: DeepSeek-R1's recipe end to end, one stage after another (R1 §2.3-2.4).

Stages, in this order, each one a table of the TOML file (a stage without a table is not run)::

    prepare             dsfs prepare: tokenizer and token shards           -> OUT/data
    pretrain            dsfs train: the base model                         -> OUT/pretrain
    pretrain_student    dsfs train: a smaller base model for distillation  -> OUT/pretrain_student
    sft                 dsfs sft: the cold start on <think> traces          -> OUT/sft
    grpo                dsfs grpo: accuracy and format rewards             -> OUT/grpo
    rejection_sampling  the GRPO model's correct completions only          -> OUT/rejection_sampling/data.jsonl
    distill             dsfs sft of the student on them (R1's distillation) -> OUT/distill
    export              the teacher and student model directories          -> OUT/export/{teacher,student}

The ``[pipeline]`` table holds ``out`` (the directory, default ``runs/pipeline``), ``seed`` and ``backend``. A
stage table holds the keyword arguments of its verb's function (`dsfs.data.prepare`, `dsfs.train.train`,
`dsfs.sft.sft`, `dsfs.grpo.grpo` with its GRPO options inline, `rejection_sample`), in the verbs' own names.
Each stage starts from the previous stages' outputs: pretrain trains on prepare's data, sft starts from pretrain,
grpo from sft, rejection sampling samples grpo's model on the GRPO prompts, distill trains pretrain_student on the
kept completions. Held-out accuracy of the teacher and the student is measured on the same problems.

``OUT/pipeline.json`` records each finished stage: its settings and its key metrics. A finished stage is skipped
(a changed table is refused: delete the stage's directory to run it again); an interrupted training stage
resumes from its newest checkpoint (the first Ctrl-C finishes the step and checkpoints); the other stages write
atomically and run again. At the end a table of the stages and their metrics is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
from pathlib import Path

from dsfs.data import plural
from dsfs.errors import ConfigError, DataError

STAGES = ("prepare", "pretrain", "pretrain_student", "sft", "grpo", "rejection_sampling", "distill", "export")
STATE = "pipeline.json"


def read_config(path: str | os.PathLike) -> dict:
    """The pipeline TOML file as a dict. Raises `ConfigError` for a missing or unparsable file, an unknown table, or
    a table that is not a table."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file (expected a TOML file of pipeline stages)")
    try:
        cfg = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    for k, v in cfg.items():
        if k != "pipeline" and k not in STAGES:
            raise ConfigError(f"--config {path}: unknown table [{k}] (expected [pipeline] and stages among "
                              f"{', '.join(STAGES)})")
        if not isinstance(v, dict):
            raise ConfigError(f"--config {path}: {k} must be a table ([{k}])")
    unknown = set(cfg.get("pipeline", {})) - {"out", "seed", "backend"}
    if unknown:
        raise ConfigError(f"--config {path}: unknown key {sorted(unknown)[0]!r} in [pipeline] (expected out, seed, "
                          "backend)")
    if not any(s in cfg for s in STAGES):
        raise ConfigError(f"--config {path}: no stage table (expected some of {', '.join(STAGES)})")
    return cfg


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def rejection_sample(model_dir: str | os.PathLike, out: str | os.PathLike, *, dataset: str = "arithmetic",
                     splits: list[str] | None = None, num_examples: int = 2000, num_generations: int = 4,
                     temperature: float = 1.0, max_completion_length: int = 96, style: str = "r1",
                     tools: bool = False, max_tool_calls: int = 2, seed: int = 0, backend: str = "auto",
                     verbose: bool = True) -> dict:
    """R1's rejection sampling (§2.3.3): sample ``num_generations`` completions of ``num_examples`` training prompts
    of ``dataset`` (a built-in task, in ``style``) from the model in ``model_dir``, keep those with accuracy and
    format rewards 1 (`dsfs.rewards`), at most one per distinct text, and write them as ``{"messages": [...]}`` rows
    to ``out`` (JSONL, atomically). Returns ``{"sampled", "kept", "prompts_kept", "acceptance"}``. Raises
    `DataError` when nothing is kept."""
    import torch

    from dsfs import chat
    from dsfs.backend import resolve_backend
    from dsfs.data import EOS
    from dsfs.rewards import accuracy_reward, format_reward
    from dsfs.rollout import completion_text, rollout
    from dsfs.stage import load_model, stage_tokenizer
    from dsfs.tasks import answer_column, load_task

    be = resolve_backend(backend)
    model = load_model(be, Path(model_dir), train=False)
    if be.name == "mlx":
        from runtime_mlx.train import from_reference

        model = from_reference(model)
    _, tok = stage_tokenizer(Path(model_dir), model.config)
    task = load_task(dataset, num_train=num_examples, num_held_out=1, seed=seed + 1, splits=splits, style=style,
                     at_most=True)
    prompts = [task.conversation(p)[:-1] for p in task.train]
    eos = tok.token_to_id(EOS)
    tool_fns = None
    if tools:
        from dsfs.tools import TOOLS as tool_fns
    with torch.no_grad():
        comps = rollout(model, [chat.render(m, tok, add_generation_prompt=True)[0] for m in prompts],
                        max_completion_length, temperature=temperature, num_generations=num_generations, seed=seed,
                        stop_token_ids=[eos], tokenizer=tok, tools=tool_fns, max_tool_calls=max_tool_calls)
    texts = [completion_text(tok, c.ids, [eos]) for c in comps]
    answers = [answer_column(dataset, p) for p in task.train for _ in range(num_generations)]
    acc = accuracy_reward([""] * len(texts), texts, answer=answers)
    fmt = format_reward([""] * len(texts), texts)
    rows, seen, prompts_kept = [], set(), set()
    for i, (text, a, f, c) in enumerate(zip(texts, acc, fmt, comps, strict=True)):
        p = i // num_generations
        if a == 1 and f == 1 and c.finish_reason == "stop" and (p, text) not in seen:
            seen.add((p, text))
            prompts_kept.add(p)
            rows.append({"messages": prompts[p] + [{"role": "assistant", "content": text}]})
    if not rows:
        raise DataError(f"rejection sampling kept no completion of {plural(len(texts), 'sample')} from {model_dir}: "
                        "the model solves none of them")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out)
    return {"sampled": len(texts), "kept": len(rows), "prompts_kept": len(prompts_kept),
            "acceptance": len(rows) / len(texts)}


def stage_keys(stage: str) -> set[str]:
    """The keys a stage's table may hold: its verb function's keyword arguments (and, for the training verbs, the
    `TrainConfig` fields they take as overrides; for grpo its GRPO options), less those the pipeline sets."""
    import inspect

    from dsfs.train_config import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    if stage == "prepare":
        from dsfs.data import prepare as fn
    elif stage in ("pretrain", "pretrain_student"):
        from dsfs.train import train as fn
    elif stage in ("sft", "distill"):
        from dsfs.sft import sft as fn
    elif stage == "grpo":
        from dsfs.grpo import GRPO_DEFAULTS
        from dsfs.grpo import grpo as fn

        fields |= set(GRPO_DEFAULTS)
    elif stage == "rejection_sampling":
        fn, fields = rejection_sample, set()
    else:
        return {"format"}
    own = set(inspect.signature(fn).parameters) - {"out_dir", "out", "model_dir", "verbose", "overrides",
                                                  "grpo_options", "resume", "overwrite"}
    return own | fields | ({"init_from"} if stage not in ("prepare",) else set())


def check_keys(stage: str, table: dict) -> None:
    """Raise `ConfigError` naming the first key of ``table`` that stage ``stage`` does not take."""
    unknown = sorted(set(table) - stage_keys(stage))
    if unknown:
        raise ConfigError(f"[{stage}]: unknown key {unknown[0]!r} (expected among: "
                          f"{', '.join(sorted(stage_keys(stage)))})")


def _finished(run_dir: Path) -> bool:
    """Whether the training run in ``run_dir`` reached its ``max_steps`` (its ``final/`` written)."""
    from dsfs.checkpointing import latest_checkpoint, load_trainer_state

    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None or not (run_dir / "final").is_dir():
        return False
    state = load_trainer_state(ckpt)
    return state["step"] >= state["train_config"]["max_steps"]


def _start(run_dir: Path) -> dict:
    """How a training stage starts in ``run_dir``: resume its newest checkpoint, or start over (a directory without
    a checkpoint holds nothing to keep)."""
    from dsfs.checkpointing import latest_checkpoint

    if run_dir.is_dir() and latest_checkpoint(run_dir) is not None:
        return {"resume": True}
    return {"overwrite": True}


def _model(out: Path, stage: str, table: dict, needs: str) -> Path:
    """The model a stage starts from: its table's ``init_from``, else stage ``needs``'s final model."""
    if "init_from" in table:
        return Path(table["init_from"])
    path = out / needs / "final"
    if not path.is_dir():
        raise ConfigError(f"stage {stage} starts from stage {needs}'s model ({path}), which is missing: add a "
                          f"[{needs}] table or an init_from to [{stage}]")
    return path


def _keys(summary: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in summary.items() if k.startswith(prefixes) and v is not None}


class Pipeline:
    """One run of a pipeline config (module docstring): ``cfg`` from `read_config`."""

    def __init__(self, cfg: dict, verbose: bool = True):
        p = cfg.get("pipeline", {})
        self.cfg, self.verbose = cfg, verbose
        self.out = Path(p.get("out", "runs/pipeline"))
        self.seed, self.backend = p.get("seed", 0), p.get("backend", "auto")
        self.state_path = self.out / STATE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"stages": {}}

    def say(self, msg: str) -> None:
        if self.verbose:
            from tqdm import tqdm

            tqdm.write(f"pipeline: {msg}")

    def run(self) -> list[dict]:
        """Run every stage of the config in order (skipping finished ones); return the table rows."""
        for stage in (s for s in STAGES if s in self.cfg):  # every table checked before anything runs
            check_keys(stage, self.cfg[stage])
        self.out.mkdir(parents=True, exist_ok=True)
        rows = []
        for stage in (s for s in STAGES if s in self.cfg):
            table = self.cfg[stage]
            rec = self.state["stages"].get(stage)
            if rec is not None and not self.output(stage).exists():  # deleted by hand: run it again
                self.say(f"stage {stage}: its output {self.output(stage)} is gone; running it again")
                rec = None
                del self.state["stages"][stage]
                _write_json(self.state_path, self.state)
            if rec is not None:
                if rec["config"] != table:
                    raise ConfigError(f"stage {stage} finished in {self.output(stage)} with other settings; delete "
                                      f"it (and later stages' outputs) to run it again with these")
                self.say(f"stage {stage}: finished earlier, skipped")
            else:
                self.say(f"stage {stage}: starting")
                t0 = time.perf_counter()
                summary = getattr(self, stage)(dict(table))
                rec = {"config": table, "summary": summary,
                       "seconds": summary.pop("elapsed_s", None) or time.perf_counter() - t0}
                self.state["stages"][stage] = rec
                _write_json(self.state_path, self.state)
            rows.append({"stage": stage, **rec})
        return rows

    def output(self, stage: str) -> Path:
        """What a finished stage leaves: its run directory, data or export directory."""
        return {"prepare": self.out / "data", "rejection_sampling": self.out / "rejection_sampling" / "data.jsonl",
                "export": self.out / "export"}.get(stage, self.out / stage)

    # ---------------------------------------------------------------- stages
    def prepare(self, t: dict) -> dict:
        from dsfs.data import load_meta, prepare

        t.setdefault("seed", self.seed)
        out = prepare(out_dir=self.out / "data", verbose=self.verbose, **t)
        meta = load_meta(out)
        return {"vocab_size": meta["vocab_size"], "train_tokens": meta.get("train_tokens")}

    def _train(self, stage: str, t: dict) -> dict:
        from dsfs.train import train

        run_dir = self.out / stage
        if _finished(run_dir):
            from dsfs.sft import last_eval

            return {"val_loss": last_eval(run_dir).get("val_loss")}
        if "data_dir" not in t:
            if "prepare" not in self.cfg:
                raise ConfigError(f"stage {stage} trains on stage prepare's data: add a [prepare] table or a "
                                  f"data_dir to [{stage}]")
            t["data_dir"] = self.out / "data"
        start = _start(run_dir)
        if start.get("resume"):
            t.pop("preset", None)
        s = train(out_dir=run_dir, seed=t.pop("seed", self.seed), backend=t.pop("backend", self.backend),
                  verbose=self.verbose, **start, **t)
        return {"val_loss": s["val_loss"], "params": s.get("params"), "elapsed_s": s["elapsed_s"]}

    def pretrain(self, t: dict) -> dict:
        return self._train("pretrain", t)

    def pretrain_student(self, t: dict) -> dict:
        return self._train("pretrain_student", t)

    def _stage_run(self, stage: str, fn, t: dict, needs: str, **kw) -> dict:
        from dsfs.sft import last_eval

        run_dir = self.out / stage
        if _finished(run_dir):
            return _keys(last_eval(run_dir), ("val_",))
        init = _model(self.out, stage, t, needs)
        t.pop("init_from", None)
        start = _start(run_dir)
        s = fn(out_dir=run_dir, init_from=None if start.get("resume") else init,
               seed=t.pop("seed", self.seed), backend=t.pop("backend", self.backend), verbose=self.verbose,
               **start, **kw, **t)
        return {**_keys(s, ("val_",)), "elapsed_s": s["elapsed_s"]}

    def sft(self, t: dict) -> dict:
        from dsfs.sft import sft

        return self._stage_run("sft", sft, t, "pretrain")

    def grpo(self, t: dict) -> dict:
        from dsfs.grpo import GRPO_DEFAULTS, grpo

        opts = {k: t.pop(k) for k in list(t) if k in GRPO_DEFAULTS}
        return self._stage_run("grpo", grpo, t, "sft", grpo_options=opts)

    def _grpo_task(self) -> dict:
        """The GRPO stage's task settings, the defaults of rejection sampling and of the accuracy comparison."""
        g = self.cfg.get("grpo", {})
        return {k: g[k] for k in ("dataset", "splits", "style", "tools", "max_tool_calls", "max_completion_length")
                if k in g}

    def rejection_sampling(self, t: dict) -> dict:
        model = _model(self.out, "rejection_sampling", t, "grpo")
        t.pop("init_from", None)
        kw = {"seed": self.seed, "backend": self.backend, "verbose": self.verbose, **self._grpo_task(), **t}
        self.say(f"rejection sampling from {model}")
        return rejection_sample(model, self.out / "rejection_sampling" / "data.jsonl", **kw)

    def distill(self, t: dict) -> dict:
        from dsfs.sft import sft

        data = self.out / "rejection_sampling" / "data.jsonl"
        if "dataset" not in t and not data.is_file():
            raise ConfigError(f"stage distill trains on the rejection-sampled data ({data}), which is missing: add a "
                              "[rejection_sampling] table or a dataset to [distill]")
        t.setdefault("dataset", str(data))
        s = self._stage_run("distill", sft, t, "pretrain_student")
        teacher = _model(self.out, "distill", {}, "grpo") if (self.out / "grpo" / "final").is_dir() else None
        return {**s, **self.compare(self.out / "distill" / "final", teacher)}

    def compare(self, student: Path, teacher: Path | None) -> dict:
        """Held-out greedy accuracy of the student and the teacher on the GRPO task's problems, and their
        parameter counts."""
        from dsfs.backend import resolve_backend
        from dsfs.data import EOS
        from dsfs.stage import load_model, stage_tokenizer
        from dsfs.tasks import accuracy, load_task

        task = self._grpo_task()
        if task.get("dataset", "arithmetic") not in ("arithmetic", "gsm8k"):
            return {}
        be = resolve_backend(self.backend)
        tools = None
        if task.get("tools"):
            from dsfs.tools import TOOLS as tools
        res = {}
        for name, path in (("student", student), ("teacher", teacher)):
            if path is None:
                continue
            model = load_model(be, path, train=False)
            n = sum(p.numel() for p in model.parameters())
            if be.name == "mlx":
                from runtime_mlx.train import from_reference

                model = from_reference(model)
            _, tok = stage_tokenizer(path, model.config)
            tk = load_task(task.get("dataset", "arithmetic"), num_held_out=self.cfg.get("grpo", {}).get(
                "eval_examples", 200), seed=self.seed, splits=task.get("splits"), style=task.get("style", "r1"))
            acc = accuracy(model, tok, tk.checks(tok), tok.token_to_id(EOS),
                           task.get("max_completion_length", 96), tools=tools,
                           max_tool_calls=task.get("max_tool_calls", 2))
            res[f"{name}_accuracy"], res[f"{name}_params"] = acc["val_accuracy"], n
        if "teacher_accuracy" in res and res["teacher_accuracy"] > 0:
            res["student_over_teacher"] = res["student_accuracy"] / res["teacher_accuracy"]
        return res

    def export(self, t: dict) -> dict:
        from reference import Model

        unknown = set(t) - {"format"}
        if unknown:
            raise ConfigError(f"[export]: unknown key {sorted(unknown)[0]!r} (expected format)")
        if t.get("format", "hf") != "hf":
            raise ConfigError(f"[export] format {t['format']!r}: expected hf (GGUF and CoreML come with dsfs export)")
        done = {}
        for name, stage in (("teacher", "grpo"), ("student", "distill")):
            src = self.out / stage / "final"
            if not src.is_dir():
                continue
            dst = self.out / "export" / name
            tmp = dst.with_name(f".tmp-{name}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            Model.from_pretrained(tmp)  # loads, checksums verified: what was copied is whole
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
            done[name] = str(dst)
        if not done:
            raise ConfigError("stage export: no model to export (expected a grpo or distill stage before it)")
        return done


def format_table(rows: list[dict]) -> str:
    """The end-of-pipeline table: one line per stage with its time and key metrics."""
    lines = [f"{'stage':<19} {'minutes':>7}  metrics"]
    for r in rows:
        m = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["summary"].items()
                      if v is not None)
        lines.append(f"{r['stage']:<19} {(r['seconds'] or 0) / 60:>7.1f}  {m}")
    return "\n".join(lines)


def pipeline(config: str | os.PathLike, verbose: bool = True) -> list[dict]:
    """Run the pipeline of the TOML file ``config`` (module docstring); print and return its table rows. Raises
    `dsfs.errors.UserError` subclasses on bad input; `dsfs.loop.Interrupted` on Ctrl-C or SIGTERM, after the
    running stage checkpointed (run the same command again to go on)."""
    from dsfs.loop import Interrupted

    p = Pipeline(read_config(config), verbose)
    try:
        rows = p.run()
    except Interrupted:
        p.say(f"interrupted; run dsfs pipeline --config {config} again to resume")
        raise
    print(format_table(rows))
    return rows


def add_pipeline(sub) -> None:
    """Register ``dsfs pipeline`` (`pipeline`)."""
    p = sub.add_parser("pipeline", help="run DeepSeek-R1's recipe end to end from one TOML file",
                       description="Run the stages prepare, pretrain, pretrain_student, sft, grpo, rejection_sampling, "
                       "distill and export that the TOML file has tables for, each in its own directory under "
                       "[pipeline] out. A finished stage is skipped, an interrupted one resumes; a table of the "
                       "stages and their metrics ends the run. Example: examples/r1-tiny.toml.")
    p.add_argument("--config", required=True, metavar="FILE.toml", help="the pipeline's stages and settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_run_pipeline)


def _run_pipeline(args) -> int:
    pipeline(args.config, verbose=not args.quiet)
    return 0
