"""Training from binary feedback: supervised fine-tuning (SFT) of a reference, then KTO of a policy.

The run, end to end (`run(config, out_dir)`, `kto-np demo`, `kto-np train`):
  1. SFT: a fresh model learns the synthetic task from a MIX of desirable and undesirable
     completions, so that, sampled, it produces both. This is the reference model. (Or
     `run(..., reference=<checkpoint or run folder>)`: a saved reference, and no SFT.)
  2. KTO: the policy starts as a copy of the reference and learns from thumbs-up / thumbs-down labels
     only. The reference log-probabilities of each epoch's batches (matched rows and KL rows) are
     computed once, at the start of the epoch, with the frozen reference. Each update is
     `train_step`: batch -> step.kto_step -> clip -> learning rate -> AdamW.
  3. Evaluation: completions sampled for held-out prompts, judged by the task's rule; the desirable
     rate of the reference ("before") against the policy ("after") on the same prompts and draws.

A run folder holds:
  config.json            the TrainConfig
  metrics.jsonl          one JSON object per step ("phase": "sft" | "kto") and per evaluation ("eval"),
                         with TRL's metric names (loss, kl, rewards/chosen, rewards/rejected,
                         rewards/margins, logps/chosen, logps/rejected, grad_norm, learning_rate)
                         and kl_raw, the KL estimate before its clamp at 0 (None when not estimated)
  checkpoints/sft.npz    latest SFT state (params, AdamW state, step): resume point
  checkpoints/reference.npz   the finished reference (a run from reference=: its copy, with extra
                         {"source": the path it came from}, and no sft.npz)
  checkpoints/kto.npz    latest KTO state: resume point; at the end, the trained policy
  trajectory/kto_step_NNNNNN.npz   the policy's parameters every ceil(steps / TRAJECTORY_POINTS) KTO
                         steps and at the last one (checkpoint.save format, extra {"step": N}): the thin
                         trajectory that `kto-np landscape --directions pca` projects (step 0 is
                         checkpoints/reference.npz)
  summary.json           before/after numbers (desirable_rate_before, desirable_rate_after, ...)
  training_curves.png    loss, rewards, KL and desirable rate against the step

Every random draw comes from a seed: the batches of epoch e from (seed, e), the dropout masks of step
s from (seed, phase, s), the evaluation samples from a fixed evaluation seed. A run interrupted after
a checkpoint and resumed ends with bit-identical parameters to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import backend, checkpoint
from .architectures import Model, build, model_from_config
from .backend import to_numpy
from .data import (
    Tokenizer,
    collate,
    completion_from_tokens,
    iterate_batches,
    make_examples,
    make_prompts,
    make_task,
    prompt_tokens,
)
from .fast.optim import adamw_step, clip_grad_norm
from .files import write_json, write_text
from .generate import generate
from .losses import VARIANTS, KTOConfig, check_balance, check_weights_not_both_zero
from .optim import adamw_init, check_adamw_state, learning_rate
from .step import Batch, forward_logps, kto_dlogits, kto_step, reference_logps, sft_step
from .validation import (
    NonFiniteError,
    check_bool,
    check_choice,
    check_finite,
    check_finite_scalar,
    check_positive_int,
)

__all__ = [
    "RunError",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "run",
    "sft_train_step",
    "train_step",
]

METRIC_NAMES = ("loss", "kl", "kl_raw", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "training_curves.png",
             "checkpoints/sft.npz", "checkpoints/reference.npz", "checkpoints/kto.npz")
PHASES = ("sft", "kto")
_PHASE_ORDER = {"sft": 0, "kto": 1, "eval": 1}  # evaluations happen during KTO
TRAJECTORY_DIR = "trajectory"
TRAJECTORY_POINTS = 20  # policy snapshots kept along the KTO phase (each one parameter set)
EVAL_SEED = 2024  # the same draws for every evaluation, so "before" and "after" are paired


# `kto-np demo` runs the TrainConfig defaults; `kto-np train` a larger model for longer.
DEMO_PRESET: dict = {}
TRAIN_PRESET: dict = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_digits": 6, "sft_steps": 8000,
                      "steps": 1000, "num_examples": 32768, "sft_examples": 32768, "eval_every": 100,
                      "checkpoint_every": 100}


class RunError(ValueError):
    """A problem with the run folder or the options, found before training starts."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. The defaults are the demo's (under a minute on 2 idle CPU cores)."""

    # the task and its data
    task: str = "sort"
    num_digits: int = 4
    sft_examples: int = 8192
    sft_desirable_fraction: float = 0.5
    num_examples: int = 8192  # KTO feedback examples
    desirable_fraction: float = 0.5
    # the model
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0
    positional: str = "learned"  # architecture "gpt2" only
    architecture: str = "gpt2"  # or "edifice": Edifice's own backbone (kto_np.edifice)
    token_embedding: str | None = None  # architecture "edifice" only: "fixed" (its default) or "learned"
    dtype: str = "float32"
    backend: str = "numpy"
    # SFT of the reference
    sft_steps: int = 3000
    sft_lr: float = 3e-3
    # KTO of the policy
    steps: int = 400
    lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    variant: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    stop_z_grad: bool = False
    # evaluation and checkpoints
    eval_every: int = 50
    eval_prompts: int = 256
    eval_temperature: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("num_digits", "sft_examples", "num_examples", "hidden_size", "num_layers",
                     "num_heads", "batch_size", "eval_every", "eval_prompts", "checkpoint_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("sft_steps", "steps", "warmup_steps", "seed"):
            check_positive_int(name, getattr(self, name), minimum=0)
        for name in ("sft_lr", "lr", "beta", "max_grad_norm"):
            check_finite_scalar(name, getattr(self, name), positive=True)
        for name in ("weight_decay", "desirable_weight", "undesirable_weight", "eval_temperature"):
            check_finite_scalar(name, getattr(self, name), nonnegative=True)
        for name in ("sft_desirable_fraction", "desirable_fraction"):
            value = check_finite_scalar(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        check_weights_not_both_zero(self.desirable_weight, self.undesirable_weight)
        check_choice("variant", self.variant, VARIANTS)
        check_choice("backend", self.backend, backend.BACKENDS)
        check_choice("task", self.task, ("sort", "reverse"))
        object.__setattr__(self, "stop_z_grad", check_bool("stop_z_grad", self.stop_z_grad))
        if self.variant == "kto" and self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 for variant 'kto': its KL estimate pairs each prompt with "
                             f"another example's completion, and a batch of one has none; got {self.batch_size}")
        for name in ("num_examples", "sft_examples"):
            if getattr(self, name) < self.batch_size:
                raise ValueError(f"{name} must be >= batch_size ({self.batch_size}), got {getattr(self, name)}")
        if self.architecture == "edifice" and self.positional != "learned":
            raise ValueError(f"positional={self.positional!r} does not apply to architecture='edifice' "
                             "(its positions are a fixed [sin | cos] table)")
        self.model_config()  # validates hidden_size, num_heads, dropout, dtype, positional, architecture

    def kto_config(self) -> KTOConfig:
        return KTOConfig(self.variant, self.beta, self.desirable_weight, self.undesirable_weight, self.stop_z_grad)

    def model_config(self):
        options = (dict(positional=self.positional, token_embedding=self.token_embedding)
                   if self.architecture == "gpt2"
                   else dict(architecture=self.architecture, token_embedding=self.token_embedding))
        return build(hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
                     vocab_size=Tokenizer().vocab_size, dropout=self.dropout,
                     max_seq_len=2 * self.num_digits + 4, dtype=self.dtype, **options).config

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# THE training step: one KTO update, everything it does in order (batch -> kto_step -> clip ->
# learning rate -> AdamW). _optimize, further down, calls it once per step and keeps resume,
# progress, evaluation, trajectory snapshots, divergence reports and checkpoints around it.


def train_step(model: Model, params: dict, opt_state: dict, batch: Batch, ref_logps, kl_ref_logps,
               kto_config: KTOConfig, *, step: int, lr_schedule: dict, max_grad_norm: float,
               weight_decay: float, train: bool = False, rng=None):
    """One KTO update of `params` and `opt_state` (both in place): (loss, metrics, grad_norm, lr).

    ref_logps, kl_ref_logps: the frozen reference's log-probs of the batch (step.reference_logps).
    lr_schedule: the keywords of optim.learning_rate besides `step` (base_lr, warmup_steps, ...).
    train, rng: dropout on, and the generator of its masks. A NaN or an infinity in the loss, the
    gradient norm or the updated parameters raises NonFiniteError naming it.
    """
    # forward and backward: the KTO loss of the batch and its gradient for every parameter
    loss, metrics, grads = kto_step(model, params, batch, ref_logps, kl_ref_logps, kto_config,
                                    train=train, rng=rng)
    check_finite("the loss", loss)
    # clip: rescale the gradients so that their global L2 norm is at most max_grad_norm
    grad_norm = clip_grad_norm(grads, max_grad_norm)
    check_finite("the gradient norm", grad_norm)
    # the learning rate of this step: linear warm-up, then cosine decay
    lr = learning_rate(step, **lr_schedule)
    # AdamW: moments, bias correction, decoupled weight decay; params and opt_state change in place
    adamw_step(params, grads, opt_state, lr=lr, weight_decay=weight_decay)
    # a step too large for the dtype overflows the parameters to infinity
    check_finite(f"params after the update with lr={lr:g} (an overflow to infinity)", params)
    return loss, metrics, grad_norm, lr


def sft_train_step(model: Model, params: dict, opt_state: dict, batch: Batch, *, step: int, lr_schedule: dict,
                   max_grad_norm: float, weight_decay: float, train: bool = False, rng=None):
    """train_step's sibling for the SFT of the reference: the same update, sft_step's loss (the mean
    negative log-likelihood of the completion tokens) in place of kto_step's."""
    loss, metrics, grads = sft_step(model, params, batch, train=train, rng=rng)
    check_finite("the loss", loss)
    grad_norm = clip_grad_norm(grads, max_grad_norm)
    check_finite("the gradient norm", grad_norm)
    lr = learning_rate(step, **lr_schedule)
    adamw_step(params, grads, opt_state, lr=lr, weight_decay=weight_decay)
    check_finite(f"params after the update with lr={lr:g} (an overflow to infinity)", params)
    return loss, metrics, grad_norm, lr


# ----------------------------------------------------------------------------------------------
# evaluation


def evaluate(model: Model, params: dict, task, prompts, *, seed: int = EVAL_SEED,
             temperature: float = 1.0) -> dict:
    """Sample one completion per prompt and judge it.

    Returns {"desirable_rate": fraction judged 1, "modes": {kind: fraction} (task.classify: "correct",
    a mistake's name, or "other"), "samples": the first 5 (prompt, completion, label)}.
    """
    tokenizer = Tokenizer()
    tokens = prompt_tokens(prompts, tokenizer)
    T0 = tokens.shape[1]
    max_new = min(task.num_digits + 2, model.config.max_seq_len - T0)
    out = generate(model, params, tokens, max_new, temperature=temperature,
                   rng=np.random.default_rng(seed), stop_token=tokenizer.end_id)
    completions = [completion_from_tokens(row[T0:], tokenizer) for row in to_numpy(out)]
    labels = [task.judge(p, c) for p, c in zip(prompts, completions)]
    modes = Counter(task.classify(p, c) for p, c in zip(prompts, completions))
    return {
        "desirable_rate": sum(labels) / len(labels),
        "modes": {kind: count / len(labels) for kind, count in sorted(modes.items())},
        "samples": [[p, c, label] for p, c, label in list(zip(prompts, completions, labels))[:5]],
    }


# ----------------------------------------------------------------------------------------------
# the run folder


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


LOCK_NAME = ".lock"  # in the run folder; never deleted (see _RunLock)


class _RunLock:
    """One writer per run folder: an exclusive fcntl.flock on <run>/.lock, held for the whole run.

    The kernel releases a flock when its process ends, however it ends (SIGKILL included), so a lock
    is never stale: a resume after a killed run just takes it. The file holds the holder's pid, host
    and start time, for the message that refuses a second writer. Where fcntl does not exist
    (Windows) there is no lock.
    """

    def __init__(self, path: str):
        self.path = path
        self.file = None

    def acquire(self, out: str) -> None:
        try:
            import fcntl  # noqa: PLC0415
        except ImportError:  # pragma: no cover - Windows
            return
        file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            raise RunError(f"--out {out!r} is in use by another run ({holder or 'no details recorded yet'}); "
                           "wait for it to end or stop it") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            import fcntl  # noqa: PLC0415

            self.file.seek(0)
            self.file.truncate()  # an unlocked file holds no holder
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


class _Run:
    """The run folder: config, metrics log, checkpoints, and the lock that makes it one run's."""

    def __init__(self, out_dir: str):
        self.out = os.fspath(out_dir)
        if not isinstance(self.out, str) or not self.out:
            raise RunError("--out must be a folder name, got an empty string")
        self.lock = _RunLock(self.path(LOCK_NAME))

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def damaged(self, what: str) -> RunError:
        return RunError(f"run folder {self.out!r} is damaged: {what}; start it again with --force")

    def prepare(self, config: TrainConfig, *, force: bool, resume: bool, reference=None) -> TrainConfig:
        """Check the folder before any training: take its lock, refuse to overwrite, load a config to
        resume, repair a torn last metrics line. reference: (source path, checkpoint) to start from,
        written as checkpoints/reference.npz before config.json."""
        if resume:
            if not os.path.isfile(self.path("config.json")):
                raise RunError(f"cannot resume: {self.out!r} has no config.json (start a new run without --resume)")
        elif os.path.exists(self.out) and not os.path.isdir(self.out):
            raise RunError(f"--out {self.out!r} exists and is not a folder")
        try:
            os.makedirs(self.path("checkpoints"), exist_ok=True)
        except OSError as exc:
            raise RunError(f"--out {self.out!r} is not writable: {exc.strerror or exc}") from exc
        self.lock.acquire(self.out)  # from here on, this process is the folder's only writer
        if resume:
            try:
                with open(self.path("config.json"), encoding="utf-8") as f:
                    config = TrainConfig.from_dict(json.load(f))
            except (OSError, TypeError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError included
                raise RunError(f"cannot resume: {self.path('config.json')!r} is not a valid config "
                               f"({exc})") from exc
        else:
            existing = [name for name in RUN_FILES if os.path.exists(self.path(name))]
            if existing and not force:
                raise RunError(
                    f"--out {self.out!r} already holds a run ({', '.join(existing)}); "
                    "pass --force to overwrite it or --resume to continue it")
        try:
            probe = self.path(".write-test")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as exc:
            raise RunError(f"--out {self.out!r} is not writable: {exc.strerror or exc}") from exc
        if resume:
            self.repair_records()
        else:
            for name in RUN_FILES:
                if os.path.exists(self.path(name)):
                    os.unlink(self.path(name))
            if reference is not None:
                source, saved = reference
                checkpoint.save(self.path("checkpoints/reference.npz"), saved.params, saved.config,
                                extra={"source": source})
            write_json(self.path("config.json"), config.to_dict())
        return config

    def repair_records(self) -> None:
        """A resume after a crash: drop a torn last line of metrics.jsonl (one without its newline).

        log() appends each record with its newline in one write, before the step's checkpoint is
        saved, so a torn line is always of a step after the last checkpoint: the resume redoes that
        step and writes its record again. Any other bad line is damage (RunError)."""
        path = self.path("metrics.jsonl")
        if not os.path.exists(path):
            return
        with open(path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            write_text(path, data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace"))
        self.records()  # every remaining line must be a record

    def records(self) -> list[dict]:
        if not os.path.exists(self.path("metrics.jsonl")):
            return []
        records = []
        with open(self.path("metrics.jsonl"), encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise self.damaged(f"metrics.jsonl line {number} is not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise self.damaged(f"metrics.jsonl line {number} is not a JSON object")
                if record.get("phase") not in _PHASE_ORDER:
                    raise self.damaged(f"metrics.jsonl line {number} has no valid 'phase' (one of "
                                       f"{tuple(_PHASE_ORDER)}), got {record.get('phase')!r}")
                step = record.get("step")
                if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                    raise self.damaged(f"metrics.jsonl line {number} has no valid 'step', got {step!r}")
                records.append(record)
        return records

    def truncate_records(self, keep) -> None:
        """Drop the records written after the checkpoint a resumed run starts from."""
        kept = [r for r in self.records() if keep(r)]
        write_text(self.path("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def load_checkpoint(self, name: str, model: Model, *, training_state: bool):
        """checkpoints/<name>.npz, checked against the run: the model of config.json and, for a resume
        point, its training state (step, AdamW state). A damaged file is a RunError naming it."""
        path = self.path(f"checkpoints/{name}.npz")
        try:
            saved = checkpoint.load(path)
        except checkpoint.CheckpointError as exc:
            raise self.damaged(str(exc)) from None
        if saved.config != model.config:
            differ = [f"{k} {v} (config.json: {model.config.to_dict()[k]})" for k, v in saved.config.to_dict().items()
                      if model.config.to_dict()[k] != v]
            raise self.damaged(f"{path!r} holds a different model than config.json describes: {', '.join(differ)}")
        if not training_state:
            return saved, None, 0
        extra = saved.extra
        step = extra.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise self.damaged(f"{path!r} has no training state (its 'step' is {step!r})")
        if extra.get("phase") not in (None, name):
            raise self.damaged(f"{path!r} is a {extra.get('phase')!r} checkpoint, not {name!r}")
        try:
            check_adamw_state(extra.get("adamw"), saved.params)
        except (TypeError, ValueError) as exc:
            raise self.damaged(f"{path!r} has no valid AdamW state ({exc})") from None
        return saved, extra["adamw"], step


# ----------------------------------------------------------------------------------------------
# the optimisation loop, shared by SFT and KTO


def _optimize(phase: str, model: Model, params: dict, examples, config: TrainConfig, run: _Run, *,
              steps: int, base_lr: float, step_fn, prepare_epoch=None, evaluate_fn=None,
              initial_eval: dict | None = None, progress: bool = True, stop_after: int | None = None,
              trajectory_every: int | None = None) -> dict:
    """Train params for `steps` AdamW steps; resume from checkpoints/<phase>.npz if it exists.

    Each epoch's batches come from iterate_batches(seed, epoch); prepare_epoch(batches) -> one extra
    value per batch (KTO: the reference log-probs), computed once when the epoch starts.
    step_fn(params, opt_state, batch, extra, **update) -> (loss, metrics, grad_norm, lr): one update in
    place (train_step, sft_train_step; update: step, lr_schedule, max_grad_norm, weight_decay, train,
    rng). A NonFiniteError from it stops the run as TrainingDiverged. Returns the trained params.
    evaluate_fn(params) -> {"desirable_rate", ...} runs every config.eval_every steps; initial_eval is
    its result for the starting params (logged as step 0). stop_after: stop (with a checkpoint) there.
    trajectory_every: also save the params as trajectory/<phase>_step_NNNNNN.npz every that many steps
    and at the last step (a resumed run rewrites the same files bit for bit).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    ckpt_path = run.path(f"checkpoints/{phase}.npz")
    opt_state = adamw_init(params)
    start = 0
    if os.path.exists(ckpt_path):
        saved, opt_state, start = run.load_checkpoint(phase, model, training_state=True)
        params = saved.params  # opt_state {"step", "m", "v"}: arrays already on the selected backend
        if start > steps:
            raise run.damaged(f"{ckpt_path!r} is at step {start}, beyond the {steps} steps of config.json")
    order = _PHASE_ORDER[phase]
    run.truncate_records(lambda r: _PHASE_ORDER[r["phase"]] < order
                         or (_PHASE_ORDER[r["phase"]] == order and r["step"] <= start))
    if initial_eval is not None and start == 0:  # (a resume from step 0 kept the earlier record)
        if not any(r["phase"] == "eval" and r["step"] == 0 for r in run.records()):
            run.log({"phase": "eval", "step": 0, "desirable_rate": initial_eval["desirable_rate"]})

    update = dict(lr_schedule=dict(base_lr=base_lr, warmup_steps=min(config.warmup_steps, steps), total_steps=steps,
                                   schedule="cosine", min_lr_ratio=0.1),
                  max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay, train=config.dropout > 0)
    tokenizer = Tokenizer()
    steps_per_epoch = len(examples) // config.batch_size
    phase_id = PHASES.index(phase)
    batches, extras, batches_epoch = [], [], None
    if trajectory_every is not None and start == 0 and os.path.isdir(run.path(TRAJECTORY_DIR)):
        for name in os.listdir(run.path(TRAJECTORY_DIR)):  # an earlier run's snapshots (--force)
            if name.startswith(f"{phase}_step_"):
                os.unlink(run.path(f"{TRAJECTORY_DIR}/{name}"))
    bar = tqdm(total=steps, initial=start, desc=phase.upper(), disable=None if progress else True, leave=False,
               dynamic_ncols=True)
    for step in range(start, steps if stop_after is None else min(steps, stop_after)):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches = [collate(b, tokenizer, dtype=config.dtype) for b in iterate_batches(
                examples, config.batch_size, seed=config.seed + 1000 * phase_id, epoch=epoch, drop_last=True)]
            extras = prepare_epoch(batches) if prepare_epoch is not None else [None] * len(batches)
            batches_epoch = epoch
        rng = np.random.default_rng([config.seed, phase_id, step])
        # Overflow is reported by name (NonFiniteError) instead of warned about on the way.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            try:
                loss, metrics, grad_norm, lr = step_fn(params, opt_state, batches[index], extras[index],
                                                       step=step, rng=rng, **update)
            except NonFiniteError as exc:  # the loss, the gradient or the parameters are NaN or infinite
                kept = (f"the last good checkpoint is {ckpt_path!r}" if os.path.exists(ckpt_path)
                        else f"no {phase} checkpoint was written yet")
                raise TrainingDiverged(f"{phase} step {step + 1}: {exc}; stopped there ({kept})") from exc
        record = {"phase": phase, "step": step + 1, "loss": loss}
        record.update({k: _finite_or_none(metrics[k]) for k in METRIC_NAMES if k in metrics})
        record.update(grad_norm=grad_norm, learning_rate=lr)
        run.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if evaluate_fn is not None and ((step + 1) % config.eval_every == 0 or step + 1 == steps):
            run.log({"phase": "eval", "step": step + 1, "desirable_rate": evaluate_fn(params)["desirable_rate"]})
        if trajectory_every is not None and ((step + 1) % trajectory_every == 0 or step + 1 == steps):
            checkpoint.save(run.path(f"{TRAJECTORY_DIR}/{phase}_step_{step + 1:06d}.npz"), params, model.config,
                            extra={"step": step + 1})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 in (steps, stop_after):
            checkpoint.save(ckpt_path, params, model.config,
                            extra={"adamw": opt_state, "step": step + 1, "phase": phase})
    bar.close()
    return params


# ----------------------------------------------------------------------------------------------
# the whole run


def kto_examples(config: TrainConfig) -> list:
    """The run's KTO feedback data: config.num_examples examples of the task (seed + 1, the
    config's desirable fraction), the examples the policy trains on."""
    return make_examples(make_task(config.task, config.num_digits), config.num_examples, seed=config.seed + 1,
                         desirable_fraction=config.desirable_fraction)


def heldout_prompts(config: TrainConfig, num_prompts: int | None = None) -> list[str]:
    """The run's held-out evaluation prompts (seed = config.seed): num_prompts of them, default
    config.eval_prompts."""
    num_prompts = config.eval_prompts if num_prompts is None else num_prompts
    return make_prompts(make_task(config.task, config.num_digits), num_prompts, seed=config.seed)


def run(config: TrainConfig, out_dir, *, force: bool = False, resume: bool = False,
        progress: bool = True, log=print, stop_after: int | None = None, reference=None) -> dict:
    """SFT the reference, KTO the policy, evaluate both; write the run folder. Returns the summary.

    reference: a checkpoint file, or a run folder (its checkpoints/reference.npz), holding the model
    of config.model_config(): the new run starts from it instead of training its own (no SFT phase).
    It is copied into the run folder as checkpoints/reference.npz (extra {"source": its path}), so a
    later `resume=True` needs no `reference`. A missing or damaged file, or another model, is a
    RunError naming it; so is `reference` with `resume=True` (a resume keeps the run's reference).
    stop_after: stop the KTO phase after this many steps (the checkpoint at that point lets a later
    `resume=True` call finish the run; used to test exact resumption).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    saved_reference = None
    if reference is not None:
        if resume:
            raise RunError("reference applies to a new run: a resume continues from the run folder's own "
                           "checkpoints/reference.npz (leave reference out, or start a new run)")
        saved_reference = _load_reference(reference, config)  # before anything in the folder changes
    run_dir = _Run(out_dir)
    try:
        config = run_dir.prepare(config, force=force, resume=resume, reference=saved_reference)
        return _run(config, run_dir, progress=progress, log=log, stop_after=stop_after)
    finally:
        run_dir.lock.release()


def _load_reference(reference, config: TrainConfig) -> tuple[str, checkpoint.Checkpoint]:
    """run(reference=...): (the checkpoint's path, the loaded checkpoint), its model config.model_config()'s."""
    if not isinstance(reference, (str, os.PathLike)):
        raise TypeError(f"reference must be a checkpoint file or a run folder (a path), got "
                        f"{type(reference).__name__}")
    path = os.fspath(reference)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", "reference.npz")
    try:
        saved = checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        raise RunError(f"cannot start from the reference: {exc}") from None
    expected = config.model_config()
    if saved.config != expected:
        theirs, ours = saved.config.to_dict(), expected.to_dict()
        differ = [f"{key} {theirs.get(key, 'unset')} (config: {ours.get(key, 'unset')})"
                  for key in {**theirs, **ours} if theirs.get(key) != ours.get(key)]
        raise RunError(f"cannot start from the reference {path!r}: it holds a different model than the "
                       f"config describes: {', '.join(differ)}")
    return os.path.abspath(path), saved


def _run(config: TrainConfig, run_dir: _Run, *, progress: bool, log, stop_after: int | None) -> dict:
    previous = backend.get_backend()
    backend.set_backend(config.backend)
    try:
        return _run_on_backend(config, run_dir, progress=progress, log=log, stop_after=stop_after)
    finally:  # the process's backend is the caller's again, however the run ends
        backend.set_backend(previous)


def _run_on_backend(config: TrainConfig, run_dir: _Run, *, progress: bool, log, stop_after: int | None) -> dict:
    started = time.perf_counter()
    task = make_task(config.task, config.num_digits)
    model = model_from_config(config.model_config(), fast=True)  # training runs on the fast room's ops
    heldout = heldout_prompts(config)

    # 1. the reference: SFT on a mix of good and bad completions (or run(reference=...)'s, already here)
    reference_path = run_dir.path("checkpoints/reference.npz")
    if os.path.exists(reference_path):
        ref_params = run_dir.load_checkpoint("reference", model, training_state=False)[0].params
        log(f"reference: {reference_path} (no SFT)")
    else:
        sft_examples = make_examples(task, config.sft_examples, seed=config.seed,
                                     desirable_fraction=config.sft_desirable_fraction)
        log(f"SFT of the reference: {config.sft_steps} steps on {len(sft_examples)} examples "
            f"({model.num_params():,} parameters)")

        def sft_update(params, opt_state, batch, extra, **update):
            return sft_train_step(model, params, opt_state, batch, **update)

        ref_params = _optimize("sft", model, model.init(config.seed), sft_examples, config, run_dir,
                               steps=config.sft_steps, base_lr=config.sft_lr, step_fn=sft_update,
                               progress=progress)
        checkpoint.save(reference_path, ref_params, model.config)

    def evaluate_fn(params):
        return evaluate(model, params, task, heldout, temperature=config.eval_temperature)

    before = evaluate_fn(ref_params)
    log(f"reference: desirable rate {before['desirable_rate']:.1%} on {len(heldout)} held-out prompts")

    # 2. the policy: KTO from binary feedback, starting from the reference
    examples = kto_examples(config)
    ratio = check_balance([label for _, _, label in examples], config.desirable_weight, config.undesirable_weight)
    log(f"KTO ({config.variant}, beta={config.beta}): {config.steps} steps on {len(examples)} examples; "
        f"lambda_D n_D / (lambda_U n_U) = {ratio if ratio is None else round(ratio, 3)}")

    kto_config = config.kto_config()

    def kto_update(params, opt_state, batch, reference, **update):
        ref_logps, kl_ref_logps = reference
        return train_step(model, params, opt_state, batch, ref_logps, kl_ref_logps, kto_config, **update)

    def reference_of_epoch(batches):
        if not kto_config.uses_kl_pairs:  # only "kto" estimates z from the KL rows
            return [(forward_logps(model, ref_params, b.tokens, b.completion_mask), None) for b in batches]
        return [reference_logps(model, ref_params, b) for b in batches]

    policy = {k: v.copy() for k, v in ref_params.items()}
    policy = _optimize("kto", model, policy, examples, config, run_dir, steps=config.steps,
                       base_lr=config.lr, step_fn=kto_update, prepare_epoch=reference_of_epoch,
                       evaluate_fn=evaluate_fn, initial_eval=before,
                       progress=progress, stop_after=stop_after,
                       trajectory_every=math.ceil(config.steps / TRAJECTORY_POINTS))
    if stop_after is not None and stop_after < config.steps:
        return {"stopped_after": stop_after}

    after = evaluate_fn(policy)
    kto_records = [r for r in run_dir.records() if r["phase"] == "kto"]
    tail = kto_records[-max(1, len(kto_records) // 10):]
    margins = [r["rewards/margins"] for r in tail if r.get("rewards/margins") is not None]
    summary = {
        "desirable_rate_before": before["desirable_rate"],
        "desirable_rate_after": after["desirable_rate"],
        "modes_before": before["modes"],
        "modes_after": after["modes"],
        "reward_margin": sum(margins) / len(margins) if margins else None,
        "kl": kto_records[-1].get("kl") if kto_records else None,
        "variant": config.variant,
        "steps": config.steps,
        "eval_prompts": len(heldout),
        "samples_before": before["samples"],
        "samples_after": after["samples"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(run_dir.path("summary.json"), summary)
    _write_curves(run_dir)
    return summary


def token_gradient_norms(model: Model, params: dict, ref_params: dict, batch: Batch, config: KTOConfig):
    """|dL/dlogits| per token of the KTO loss of `batch`: [B, T], column t for the logits that score
    token t (the logits at t - 1); 0 where nothing is scored (the prompt, padding, position 0)."""
    ref_logps, kl_ref_logps = reference_logps(model, ref_params, batch)
    _, _, dlogits, _ = kto_dlogits(model, params, batch, ref_logps, kl_ref_logps, config)
    dlogits = to_numpy(dlogits).astype(np.float64)  # [B, T, V]
    norms = np.zeros(dlogits.shape[:2])
    norms[:, 1:] = np.sqrt((dlogits[:, :-1] ** 2).sum(axis=-1))
    return norms


def run_token_gradients(out_dir, num_examples: int = 6):
    """The first KTO step of a finished run (policy = reference), per token, for `num_examples`
    held-out-style examples of its task: a plots.TokenGradients for plot_token_gradients."""
    from .plots import TokenGradients  # noqa: PLC0415

    run_dir = _Run(out_dir)
    with open(run_dir.path("config.json"), encoding="utf-8") as f:
        config = TrainConfig.from_dict(json.load(f))
    reference = checkpoint.load(run_dir.path("checkpoints/reference.npz"))
    model = model_from_config(reference.config)
    task = make_task(config.task, config.num_digits)
    examples = make_examples(task, num_examples, seed=config.seed + 2)
    batch = collate(examples, Tokenizer(), dtype=model.config.dtype)
    norms = token_gradient_norms(model, reference.params, reference.params, batch, config.kto_config())
    tokens = to_numpy(batch.tokens)
    tokenizer = Tokenizer()
    text = [[tokenizer.decode([t]) if t != tokenizer.pad_id else "" for t in row] for row in tokens]
    return TokenGradients(norms, text, np.array([label == 1 for _, _, label in examples]))


def _write_curves(run_dir: _Run) -> None:
    from .plots import plot_training_curves, save_figure  # noqa: PLC0415  (matplotlib only when plotting)

    save_figure(plot_training_curves(run_dir.records()), run_dir.path("training_curves.png"))

