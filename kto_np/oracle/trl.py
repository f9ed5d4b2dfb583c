"""Checking the installed TRL's own KTOTrainer against the cases: `kto-np oracle trl`.

Two levels, each a candidate in the kto_np convention that drives TRL's real code:

  loss   TRL >= 1.6: KTOTrainer.compute_loss (-> _compute_loss) on a real trainer, with a stand-in model whose
         per-token log-probs are the case's log-probs (so TRL's KL-pair path, its z_ref, the loss and the
         metrics are TRL's; autograd gives the gradients). TRL <= 1.5: the trainer's own kto_loss method.
         loss_type "kto" and "apo_zero_unpaired".
  model  a KTOTrainer constructed on a transformers GPT2LMHeadModel holding a model case's float64 weights, a
         four-row in-memory dataset (the case's prompts and completions as text, tokenized by a word-level
         tokenizer whose ids are the case's token ids) and the case's reference log-probs as precomputed
         columns. TRL tokenizes, builds the KL completions, collates, runs its log-prob path (>= 1.6: the fused
         LM head) and its loss; loss.backward() gives every parameter's gradient.

Everything is offline (HF_HUB_OFFLINE=1): nothing is downloaded. TRL, transformers, datasets and torch are
optional (the `oracle-trl` extra); without them main_trl returns 2 with one line saying what to install.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import Any, NamedTuple

import numpy as np

INSTALL_HINT = 'pip install "kto_np[oracle-trl]" (trl, transformers, datasets; torch installed first)'
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
PAD_ID = 0  # the cases pad completions with token 0
EOS_SUFFIX = ">"  # every token's text ends with it, so TRL's add-EOS step leaves the completions as they are


class TRLUnavailable(Exception):
    """TRL (or what it needs) is not installed, or is a version this module cannot drive (exit status 2)."""


class TRLApi(NamedTuple):
    version: str
    api: str  # "compute_loss" (TRL >= 1.6: the loss inside KTOTrainer._compute_loss) or "kto_loss" (<= 1.5)
    trainer_class: Any
    config_class: Any

    @property
    def describe(self) -> str:
        where = ("KTOTrainer._compute_loss, the loss inlined (TRL >= 1.6)" if self.api == "compute_loss"
                 else "KTOTrainer.kto_loss (TRL <= 1.5)")
        return f"TRL {self.version}: {where}"


@contextlib.contextmanager
def _quiet():
    """TRL's and datasets' progress bars, log lines and deprecation warnings kept out of the report."""
    loggers = [logging.getLogger(n) for n in ("transformers", "trl", "datasets", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.lru_cache(maxsize=1)
def trl_api() -> TRLApi:
    """The installed TRL and which of its KTO code paths this module drives; TRLUnavailable otherwise."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    missing = []
    for module in ("torch", "transformers", "datasets", "trl"):
        try:
            with _quiet():
                __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TRLUnavailable(f"{', '.join(missing)} not installed: {INSTALL_HINT}")
    import trl  # noqa: PLC0415

    version = getattr(trl, "__version__", "unknown")
    try:
        with _quiet():
            from trl import KTOConfig, KTOTrainer  # noqa: PLC0415
    except ImportError as exc:
        raise TRLUnavailable(f"TRL {version} has no KTOTrainer ({exc}): {INSTALL_HINT}") from exc
    if callable(getattr(KTOTrainer, "kto_loss", None)):
        api = "kto_loss"
    elif callable(getattr(KTOTrainer, "_compute_loss", None)):
        api = "compute_loss"
    else:
        raise TRLUnavailable(f"TRL {version}'s KTOTrainer has neither kto_loss nor _compute_loss: a version this "
                             f"check cannot drive; {INSTALL_HINT}")
    return TRLApi(version, api, KTOTrainer, KTOConfig)


# ---------------------------------------------------------------------------------------------------
# the pieces a trainer needs: tokenizer, model, dataset, config


def token_text(token_id: int) -> str:
    return f"<{int(token_id)}{EOS_SUFFIX}"


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token `<j>` has id j (no special tokens added, no download). Its eos_token is
    the text every token ends with, so TRL adds no EOS to the completions (the cases have none)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tokenizer = Tokenizer(models.WordLevel(vocab={token_text(i): i for i in range(vocab_size)},
                                           unk_token=token_text(PAD_ID)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=token_text(PAD_ID),
                                   eos_token=AddedToken(EOS_SUFFIX, single_word=True, special=True))


def gpt2_model(state_dict, config):
    """transformers GPT2LMHeadModel (float64) holding a case's weights (Hugging Face names, Conv1D [in, out])."""
    import torch  # noqa: PLC0415
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415

    with _quiet():
        model = GPT2LMHeadModel(GPT2Config(**dict(config), bos_token_id=None, eos_token_id=None,
                                           pad_token_id=PAD_ID)).double()
    tensors = {k: torch.as_tensor(np.array(v, dtype=np.float64) if not hasattr(v, "detach") else v.detach())
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=False)
    missing = set(dict(model.named_parameters())) - set(tensors)
    if missing:
        raise ValueError(f"state_dict lacks {sorted(missing)[:3]}")
    return model


def _rows(prompt_tokens, completion_tokens, completion_mask, labels, ref_logps=None, kl_ref_logps=None,
          ref_columns=("ref_logps", "ref_KL_logps")) -> list[dict]:
    rows = []
    for i in range(len(labels)):
        length = int(round(float(np.sum(completion_mask[i]))))
        row = {"prompt": " ".join(token_text(t) for t in prompt_tokens[i]),
               "completion": "".join(" " + token_text(t) for t in completion_tokens[i][:length]),
               "label": bool(labels[i])}
        if ref_logps is not None:
            row[ref_columns[0]] = float(ref_logps[i])
            row[ref_columns[1]] = float(kl_ref_logps[i])
        rows.append(row)
    return rows


def _trainer(api: TRLApi, model, rows: list[dict], vocab_size: int, *, loss_type: str, beta: float,
             desirable_weight: float, undesirable_weight: float, output_dir: str):
    import datasets  # noqa: PLC0415

    arguments = dict(output_dir=output_dir, beta=beta, desirable_weight=desirable_weight,
                     undesirable_weight=undesirable_weight, loss_type=loss_type,
                     per_device_train_batch_size=len(rows), report_to="none", use_cpu=True, max_length=None,
                     disable_dropout=True, save_strategy="no", logging_strategy="no", remove_unused_columns=False)
    with _quiet():
        args = api.config_class(**arguments)
        return api.trainer_class(model=model, ref_model=copy.deepcopy(model), args=args,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=word_tokenizer(vocab_size))


def _as_numpy(value):
    if value is None:
        return None
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _train_metrics(trainer) -> dict:
    """TRL's logged metrics of the last call, as the oracle names them (None where TRL logged nothing)."""
    metrics = getattr(trainer, "_metrics", None)
    logged = metrics["train"] if isinstance(metrics, dict) else {}
    out = {}
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        values = logged.get(name)
        out[name] = float(values[-1]) if values else None
    for name in ("count/chosen", "count/rejected"):  # TRL <= 1.5 logs sums and counts
        if logged.get(name):
            out[name] = float(logged[name][-1])
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        sums, counts = logged.get(f"{name}_sum"), logged.get(f"count/{name.split('/')[1]}")
        if out.get(name) is None and sums and counts:
            out[name] = float(sums[-1]) / float(counts[-1])
    if out.get("rewards/margins") is None and out.get("rewards/chosen") is not None \
            and out.get("rewards/rejected") is not None:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# ---------------------------------------------------------------------------------------------------
# model level


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 1


@contextlib.contextmanager
def _float64_default():
    """torch's default dtype float64 while TRL runs: its collator builds the precomputed reference log-probs with
    torch.tensor(list of floats), which would otherwise round the case's float64 values to float32."""
    import torch  # noqa: PLC0415

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_kto(state_dict, config, prompt_tokens, completion_tokens, completion_mask, labels, ref_logps, kl_ref_logps,
              beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer on the case's GPT-2: its dataset preparation (tokenize, KL completions), collator,
    log-prob path and loss; returns the loss, every parameter's gradient (loss.backward()), the token batches TRL
    built and its metrics, in TRL's own dtypes."""
    api = trl_api()
    if _major(api.version) < 1:
        raise TRLUnavailable(f"the model level drives TRL >= 1.0; TRL {api.version}'s data pipeline appends an EOS "
                             "token id the case's model does not have (pip install 'trl>=1.0'; the loss level "
                             "still runs)")
    state_dict = {k: _as_numpy(v) for k, v in state_dict.items()}
    model = gpt2_model(state_dict, config)
    columns = ("ref_logps", "ref_KL_logps") if api.api == "compute_loss" else ("reference_logps",
                                                                              "reference_KL_logps")
    rows = _rows(*(_as_numpy(x) for x in (prompt_tokens, completion_tokens, completion_mask, labels, ref_logps,
                                          kl_ref_logps)), ref_columns=columns)
    with tempfile.TemporaryDirectory(prefix="kto_np-trl-") as output_dir, _float64_default():
        trainer = _trainer(api, model, rows, int(config["vocab_size"]), loss_type="kto", beta=float(beta),
                           desirable_weight=float(desirable_weight), undesirable_weight=float(undesirable_weight),
                           output_dir=output_dir)
        # the reference log-probs are the case's: read from the batch, as with precompute_ref_log_probs=True
        trainer.precompute_ref_logps = True
        with _quiet():
            batch = next(iter(trainer.get_train_dataloader()))
            trainer.model.train()
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
    prefix = "" if api.api == "compute_loss" else "completion_"
    kl_prefix = "KL_" if api.api == "compute_loss" else "KL_completion_"
    out = {"loss": _as_numpy(loss), "grads": {name: _as_numpy(p.grad) if p.grad is not None else np.zeros(p.shape)
                                              for name, p in trainer.model.named_parameters()},
           "tokens": _as_numpy(batch[f"{prefix}input_ids"]), "kl_tokens": _as_numpy(batch[f"{kl_prefix}input_ids"])}
    if api.api == "compute_loss":
        out["sequence_mask"] = _as_numpy(batch["completion_mask"])
        out["kl_sequence_mask"] = _as_numpy(batch["KL_completion_mask"])
    out.update(_train_metrics(trainer))
    return out


# ---------------------------------------------------------------------------------------------------
# loss level


class _LogpsModel:
    """Stands in for the model inside TRL >= 1.6's _compute_loss: called with fused_lm_head=True it returns the
    case's sequence log-probs as per-token log-probs of a 2-token row ([prompt ; completion]: one scored
    position). Row marker token 1 = the matched rows, 2 = the KL rows (TRL calls the KL rows under no_grad)."""

    def __init__(self, policy_logps, kl_policy_logps):
        self.policy_logps, self.kl_policy_logps = policy_logps, kl_policy_logps

    def __call__(self, input_ids=None, labels=None, fused_lm_head=False, **kwargs):
        import torch  # noqa: PLC0415

        if not fused_lm_head:
            raise TypeError("the stand-in model answers fused_lm_head=True calls only")
        logps = self.kl_policy_logps if int(input_ids[0, 1]) == 2 else self.policy_logps
        log_probs = logps[:, None] * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(log_probs).detach()
        return type("FusedOutput", (), {"log_probs": log_probs, "entropy": zeros, "mean_logits": zeros,
                                        "aux_loss": None})()


@functools.lru_cache(maxsize=4)
def _loss_trainer(loss_type: str):
    """A real KTOTrainer for the loss level, built once on the first model case's GPT-2 and its four rows."""
    from .cases import generate_cases, state_dict_from_inputs  # noqa: PLC0415

    api = trl_api()
    case = next(c for c in generate_cases() if c.kind == "model_kto")
    inputs = case.inputs
    rows = _rows(inputs["prompt_tokens"], inputs["completion_tokens"], inputs["completion_mask"], inputs["labels"])
    output_dir = tempfile.mkdtemp(prefix="kto_np-trl-")
    trainer = _trainer(api, gpt2_model(state_dict_from_inputs(inputs), case.config), rows,
                       int(case.config["vocab_size"]), loss_type=loss_type, beta=0.1, desirable_weight=1.0,
                       undesirable_weight=1.0, output_dir=output_dir)
    trainer.precompute_ref_logps = True
    return trainer


def _torch(value, like=None):
    import torch  # noqa: PLC0415

    if hasattr(value, "detach"):
        return value
    return torch.as_tensor(np.asarray(value, dtype=np.float64) if like is None else np.asarray(value))


def _trl_loss(loss_type: str, policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
              kl_policy_logps=None, kl_ref_logps=None) -> dict:
    import torch  # noqa: PLC0415

    api = trl_api()
    trainer = _loss_trainer(loss_type)
    trainer.beta, trainer.desirable_weight, trainer.undesirable_weight = (float(beta), float(desirable_weight),
                                                                          float(undesirable_weight))
    policy_logps, ref_logps = _torch(policy_logps), _torch(ref_logps)
    labels = torch.as_tensor(np.asarray(_as_numpy(labels), dtype=bool))
    n = int(policy_logps.shape[0])
    if kl_policy_logps is None:  # no KL pairs: a zero KL estimate (z_ref = 0)
        kl_policy_logps = kl_ref_logps = torch.zeros(n, dtype=policy_logps.dtype)
    kl_policy_logps, kl_ref_logps = _torch(kl_policy_logps), _torch(kl_ref_logps)
    for values in getattr(trainer, "_metrics", {}).values():
        values.clear()
    if api.api == "kto_loss":  # TRL <= 1.5: the split signature, on the real trainer
        with _quiet():
            losses, chosen_rewards, rejected_rewards, kl = trainer.kto_loss(
                policy_logps[labels], policy_logps[~labels], kl_policy_logps, ref_logps[labels],
                ref_logps[~labels], kl_ref_logps)
        metrics = {"kl": float(kl.reshape(-1)[0]) if loss_type == "kto" else 0.0,
                   "rewards/chosen": float(chosen_rewards.mean()) if chosen_rewards.numel() else None,
                   "rewards/rejected": float(rejected_rewards.mean()) if rejected_rewards.numel() else None}
        return {"loss": losses.nanmean(), **metrics}
    markers = torch.zeros((n, 2), dtype=torch.int64)
    kl_markers = markers.clone()
    markers[:, 1], kl_markers[:, 1] = 1, 2
    completion_mask = torch.tensor([[0, 1]] * n, dtype=torch.int64)
    batch = {"input_ids": markers, "attention_mask": torch.ones_like(markers), "completion_mask": completion_mask,
             "label": labels, "ref_logps": ref_logps}
    if trainer.calculate_KL:
        batch.update(KL_input_ids=kl_markers, KL_attention_mask=torch.ones_like(kl_markers),
                     KL_completion_mask=completion_mask.clone(), ref_KL_logps=kl_ref_logps)
    with _quiet():
        loss = trainer.compute_loss(_LogpsModel(policy_logps, kl_policy_logps), batch)
    return {"loss": loss, **_train_metrics(trainer)}


def kto_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
             kl_ref_logps=None):
    """TRL's KTO loss (loss_type "kto") on a case's log-probs, in the kto_np convention."""
    return _trl_loss("kto", policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                     kl_policy_logps, kl_ref_logps)


def apo_zero_unpaired_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
    """TRL's loss_type "apo_zero_unpaired" on a case's log-probs, in the kto_np convention."""
    return _trl_loss("apo_zero_unpaired", policy_logps, ref_logps, labels, beta, desirable_weight,
                     undesirable_weight)


# ---------------------------------------------------------------------------------------------------
# the command


class Level(NamedTuple):
    label: str
    candidate: Any
    kind: str
    variant: str


LEVELS = {
    "loss": (Level("loss level, loss_type kto", kto_loss, "kto_loss", "kto"),
             Level("loss level, loss_type apo_zero_unpaired", apo_zero_unpaired_loss, "kto_loss",
                   "apo_zero_unpaired")),
    "model": (Level("model level (GPT-2 through KTOTrainer: dataset, collator, log-prob head, KL pairs, loss)",
                    model_kto, "model_kto", "kto"),),
}


def fused_head(api: TRLApi) -> bool:
    """Whether the installed KTOTrainer scores tokens with TRL's fused LM head (float32 tiles, TRL >= 1.6)."""
    module = sys.modules.get(api.trainer_class.__module__)
    return api.api == "compute_loss" and hasattr(module, "add_fused_lm_head")


def float32_points(api: TRLApi) -> list[str]:
    """Where the installed TRL computes the model level in float32 for a float64 model."""
    if fused_head(api):
        return ["its fused log-prob head (add_fused_lm_head) projects the hidden states and log-softmaxes them in "
                "float32 tiles, so the log-probs, the loss and the gradients are float32"]
    return []


def run_trl(levels=("loss", "model"), *, out=None) -> int:
    """Check the installed TRL at the given levels, print each report; 0 pass, 1 fail, 2 TRL unusable."""
    from .check import verify  # noqa: PLC0415

    out = out or sys.stdout
    try:
        api = trl_api()
    except TRLUnavailable as exc:
        print(f"kto-np oracle trl: {exc}", file=sys.stderr)
        return 2
    print(f"{api.describe}; transformers {sys.modules['transformers'].__version__}, torch "
          f"{sys.modules['torch'].__version__}; offline (HF_HUB_OFFLINE=1)", file=out)
    verdicts = []
    for level_name in levels:
        for level in LEVELS[level_name]:
            tolerance = "float64"
            if level.kind == "model_kto" and float32_points(api):
                tolerance = "float32"
                print("TRL computes in float32 here, for a float64 model: " + "; ".join(float32_points(api))
                      + ". Checked at float32 tolerance.", file=out)
            if level.kind == "model_kto" and _major(api.version) < 1:
                print(f"kto-np oracle trl: {level.label} not driven: the model level drives TRL >= 1.0; TRL "
                      f"{api.version} appends an EOS token id the case's model does not have (pip install "
                      "'trl>=1.0')", file=sys.stderr)
                verdicts.append((level.label, None))
                continue
            try:
                report = verify(level.candidate, level.kind, level.variant, tolerance=tolerance, isolate=False)
            except TRLUnavailable as exc:
                print(f"kto-np oracle trl: {exc}", file=sys.stderr)
                return 2
            report.notes = [("ran in this process: TRL's installed code, driven by kto_np (not a candidate to isolate)"
                             if note.startswith("not isolated:") else note) for note in report.notes]
            print(f"== {level.label}", file=out)
            print(report, file=out)
            verdicts.append((level.label, report.passed))
    for label, passed in verdicts:
        verdict = "not driven" if passed is None else "PASSED" if passed else "FAILED"
        print(f"TRL {api.version} {label}: {verdict}", file=out)
    if any(p is False for _, p in verdicts):
        return 1
    return 2 if any(p is None for _, p in verdicts) else 0


def main_trl(level: str = "all") -> int:
    """`kto-np oracle trl [--level loss|model|all]`."""
    if level not in ("all", *LEVELS):
        print(f"kto-np oracle trl: level must be one of all, {', '.join(LEVELS)}; got {level!r}", file=sys.stderr)
        return 2
    return run_trl(tuple(LEVELS) if level == "all" else (level,))
