"""Checking the installed TRL's own KTOTrainer against the cases: `kto-np oracle trl`.

Two levels, each a candidate in the kto_np convention that drives TRL's real code:

  loss   TRL whose KTOTrainer has a kto_loss method (0.x to 1.5): that method, on a real trainer. TRL >= 1.6 (the
         loss inlined in KTOTrainer._compute_loss): compute_loss on a real trainer, with a batch carrying the keys
         TRL's own collator produces and a stand-in model whose per-token log-probs are the case's log-probs (so
         TRL's KL-pair path, its z_ref, the loss and the metrics are TRL's; autograd gives the gradients). The
         stand-in answers both ways TRL calls a model: `.logits` (TRL <= 1.14) and `fused_lm_head=True`
         (TRL >= 1.15). loss_type "kto" and "apo_zero_unpaired".
  model  a KTOTrainer constructed on a transformers GPT2LMHeadModel holding a model case's float64 weights, a
         four-row in-memory dataset (the case's prompts and completions as text, tokenized by a word-level
         tokenizer whose ids are the case's token ids) and the case's reference log-probs as precomputed
         columns. TRL tokenizes, builds the KL completions, collates, runs its log-prob path (logits, or the
         fused LM head on TRL >= 1.15) and its loss; loss.backward() gives every parameter's gradient.

"Cannot drive this TRL" is never a verdict: TRL or what it needs absent, a transformers too new for it, a fused
head without Triton, a batch key the stand-in does not fill, TRL raising where it gave no numbers — each is
exit status 2 with one line naming the cause (TRLUnavailable). FAILED means TRL's numbers were compared and
are wrong. Everything is offline (HF_HUB_OFFLINE=1): nothing is downloaded.
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
import traceback
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

INSTALL_HINT = 'pip install "kto_np[oracle-trl]" (trl, transformers, datasets; torch installed first)'
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
PAD_ID = 0  # the cases pad completions with token 0
EOS_SUFFIX = ">"  # every token's text ends with it, so TRL >= 1.3's add-EOS step leaves the completions as they are
# the loss level's stand-in rows: [marker, TARGET]; the marker says which rows TRL asks the model about
MATCHED_MARKER, KL_MARKER, TARGET = 2, 3, 1
NO_KL_LOGP = -1.0  # a case without KL pairs: policy and reference KL log-probs both this, so z_ref = 0 exactly


class TRLUnavailable(Exception):
    """This TRL cannot be driven here: absent, or a version or setting this module cannot drive (exit status 2).
    The message is the one line the command prints; every_level: no level can run (the trainer cannot be built)."""

    def __init__(self, message: str, *, every_level: bool = False):
        super().__init__(message)
        self.every_level = every_level


class TRLApi(NamedTuple):
    version: str
    api: str  # "kto_loss" (the split-signature method, TRL <= 1.5) or "compute_loss" (the loss inlined, >= 1.6)
    trainer_class: Any
    config_class: Any

    @property
    def describe(self) -> str:
        where = ("KTOTrainer._compute_loss, the loss inlined (TRL >= 1.6)" if self.api == "compute_loss"
                 else "KTOTrainer.kto_loss (TRL <= 1.5)")
        return f"TRL {self.version}: {where}"

    @property
    def ref_columns(self) -> tuple[str, str]:
        """The dataset columns TRL reads precomputed reference log-probs from."""
        return ("ref_logps", "ref_KL_logps") if self.api == "compute_loss" else ("reference_logps",
                                                                                 "reference_KL_logps")


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 1


def one_line(exc: BaseException) -> str:
    """"Type: message (at file:line)" at the deepest frame outside this module, on one line."""
    here = str(Path(__file__).resolve())
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(Path(f.filename).resolve()) != here]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(exc).split())
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(exc).__name__}: {message}{where}"


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


def _version_of(module: str) -> str:
    return str(getattr(sys.modules.get(module), "__version__", "absent"))


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
    version = _version_of("trl")
    try:
        with _quiet():
            from trl import KTOConfig, KTOTrainer  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - any import failure means this TRL cannot be driven here
        raise TRLUnavailable(f"TRL {version}'s KTOTrainer does not import here ({one_line(exc)})") from exc
    return api_for(KTOTrainer, KTOConfig, version)


def api_for(trainer_class, config_class, version: str) -> TRLApi:
    """Which code path a KTOTrainer class offers: its kto_loss method, else its _compute_loss."""
    if callable(getattr(trainer_class, "kto_loss", None)):
        return TRLApi(version, "kto_loss", trainer_class, config_class)
    if callable(getattr(trainer_class, "_compute_loss", None)):
        return TRLApi(version, "compute_loss", trainer_class, config_class)
    raise TRLUnavailable(f"TRL {version}'s KTOTrainer has neither kto_loss nor _compute_loss: a version this check "
                         "cannot drive")


def fused_head(api: TRLApi) -> bool:
    """Whether the installed KTOTrainer scores tokens with TRL's fused LM head (TRL >= 1.15: float32 tiles)."""
    module = sys.modules.get(api.trainer_class.__module__)
    return api.api == "compute_loss" and hasattr(module, "add_fused_lm_head")


def _fused_head_kernel_missing(api: TRLApi) -> bool:
    """TRL 1.15's fused head calls trl.kernels' Triton kernel with no fallback; without Triton it is None."""
    if not fused_head(api):
        return False
    utils = sys.modules.get("trl.trainer.utils")
    return utils is not None and getattr(utils, "_ChunkedLogProbFunction", False) is None and not hasattr(
        utils, "_use_triton")


def float32_points(api: TRLApi) -> list[str]:
    """Where the installed TRL computes the model level in float32 for a float64 model."""
    if fused_head(api):
        return ["its fused log-prob head (add_fused_lm_head) projects the hidden states and log-softmaxes them in "
                "float32 tiles, so the log-probs, the loss and the gradients are float32"]
    return []


# ---------------------------------------------------------------------------------------------------
# the pieces a trainer needs: tokenizer, model, dataset, config, metrics


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
    """A real KTOTrainer on the rows; TRLUnavailable (with TRL's own error) when this TRL cannot be built here."""
    import datasets  # noqa: PLC0415

    arguments = dict(output_dir=output_dir, beta=beta, desirable_weight=desirable_weight,
                     undesirable_weight=undesirable_weight, loss_type=loss_type,
                     per_device_train_batch_size=len(rows), report_to="none", use_cpu=True, max_length=None,
                     disable_dropout=True, save_strategy="no", logging_strategy="no", remove_unused_columns=False)
    try:
        with _quiet():
            args = api.config_class(**arguments)
            trainer = api.trainer_class(model=model, ref_model=copy.deepcopy(model), args=args,
                                        train_dataset=datasets.Dataset.from_list(rows),
                                        processing_class=word_tokenizer(vocab_size))
    except Exception as exc:  # noqa: BLE001 - TRL refusing our setup is "cannot drive", not a verdict
        hint = ""
        if _major(_version_of("transformers")) >= 5 and "warnings_issued" in str(exc):
            hint = (f"; TRL {api.version} predates transformers 5 (installed: {_version_of('transformers')}): "
                    "pip install 'transformers<5' or a newer trl")
        raise TRLUnavailable(f"TRL {api.version}'s KTOTrainer cannot be built here ({one_line(exc)}){hint}",
                             every_level=True) from exc
    return trainer


def _as_numpy(value):
    if value is None:
        return None
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


METRIC_NAMES = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _metric_store(trainer) -> dict:
    """TRL's metrics of the training mode: `_metrics["train"]` (TRL >= 1.4) or `_stored_metrics["train"]`
    (TRL <= 1.3); {} when the trainer keeps neither."""
    for attribute in ("_metrics", "_stored_metrics"):
        store = getattr(trainer, attribute, None)
        if isinstance(store, dict) and store.get("train"):
            return store["train"]
    return {}


def _clear_metrics(trainer) -> None:
    for attribute in ("_metrics", "_stored_metrics"):
        store = getattr(trainer, attribute, None)
        if isinstance(store, dict):
            for values in store.values():
                values.clear()


def _train_metrics(trainer) -> dict:
    """TRL's logged metrics of the last call, as the oracle names them. A metric TRL logged nothing for is left
    out (the oracle then cannot verify it), except that a class absent from the batch is None, as the cases say."""
    logged = _metric_store(trainer)
    if not logged:
        return {}
    out = {}
    for name in METRIC_NAMES:
        values = logged.get(name)
        if values:
            out[name] = float(values[-1])
    for split in ("chosen", "rejected"):  # TRL <= 1.5 logs sums and counts
        counts = logged.get(f"count/{split}")
        if not counts:
            continue
        for name in ("rewards", "logps"):
            sums = logged.get(f"{name}/{split}_sum")
            if f"{name}/{split}" not in out and sums:
                out[f"{name}/{split}"] = float(sums[-1]) / float(counts[-1]) if float(counts[-1]) else None
    if "rewards/margins" not in out and out.get("rewards/chosen") is not None \
            and out.get("rewards/rejected") is not None:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# ---------------------------------------------------------------------------------------------------
# model level


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


def _first_key(batch, *names) -> str:
    for name in names:
        if name in batch:
            return name
    raise TRLUnavailable(f"TRL's batch has none of the keys {', '.join(names)} (it has {', '.join(sorted(batch))})")


def _check_token_ids(api: TRLApi, trainer, vocab_size: int) -> None:
    """TRL <= 1.2 (and 0.x) append the tokenizer's EOS id to every completion whatever it ends with; the case's
    model has no such token and the case's completions have no EOS, so TRL would score another sequence."""
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is None or not hasattr(dataset, "column_names"):
        return
    for column in dataset.column_names:
        if not column.endswith("input_ids") and not column.endswith("_ids"):
            continue
        values = dataset[column]
        if values and isinstance(values[0], list) and any(int(t) >= vocab_size for row in values for t in row):
            raise TRLUnavailable(f"TRL {api.version}'s data preparation appends the tokenizer's EOS token to every "
                                 f"completion (column {column!r}); the case's completions have none and its model "
                                 "has no such token, so the model level cannot drive this release (the loss level "
                                 "still runs)")


def model_kto(state_dict, config, prompt_tokens, completion_tokens, completion_mask, labels, ref_logps, kl_ref_logps,
              beta, desirable_weight, undesirable_weight):
    """TRL's KTOTrainer on the case's GPT-2: its dataset preparation (tokenize, KL completions), collator,
    log-prob path and loss; returns the loss, every parameter's gradient (loss.backward()), the token batches TRL
    built and its metrics, in TRL's own dtypes."""
    api = trl_api()
    if _fused_head_kernel_missing(api):
        raise TRLUnavailable(f"TRL {api.version}'s fused LM head needs Triton (trl.kernels) and has no fallback; "
                             f"torch {_version_of('torch')} here has no Triton, so the model level cannot run (the "
                             "loss level still runs; TRL >= 1.16 falls back to torch)")
    state_dict = {k: _as_numpy(v) for k, v in state_dict.items()}
    vocab_size = int(config["vocab_size"])
    model = gpt2_model(state_dict, config)
    rows = _rows(*(_as_numpy(x) for x in (prompt_tokens, completion_tokens, completion_mask, labels, ref_logps,
                                          kl_ref_logps)), ref_columns=api.ref_columns)
    with tempfile.TemporaryDirectory(prefix="kto_np-trl-") as output_dir, _float64_default():
        trainer = _trainer(api, model, rows, vocab_size, loss_type="kto", beta=float(beta),
                           desirable_weight=float(desirable_weight), undesirable_weight=float(undesirable_weight),
                           output_dir=output_dir)
        _check_token_ids(api, trainer, vocab_size)
        # the reference log-probs are the case's: read from the batch, as with precompute_ref_log_probs=True
        trainer.precompute_ref_log_probs = trainer.precompute_ref_logps = True
        _clear_metrics(trainer)
        with _quiet():
            batch = next(iter(trainer.get_train_dataloader()))
        for column in api.ref_columns:
            if column not in batch:
                raise TRLUnavailable(f"TRL {api.version}'s collator does not pass the precomputed reference "
                                     f"log-probs column {column!r} on")
        with _quiet():
            trainer.model.train()
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
    out = {"loss": _as_numpy(loss), "grads": {name: _as_numpy(p.grad) if p.grad is not None else np.zeros(p.shape)
                                              for name, p in trainer.model.named_parameters()},
           "tokens": _as_numpy(batch[_first_key(batch, "input_ids", "completion_input_ids")]),
           "kl_tokens": _as_numpy(batch[_first_key(batch, "KL_input_ids", "KL_completion_input_ids")])}
    if "completion_mask" in batch and "KL_completion_mask" in batch:
        out["sequence_mask"] = _as_numpy(batch["completion_mask"])
        out["kl_sequence_mask"] = _as_numpy(batch["KL_completion_mask"])
    out.update(_train_metrics(trainer))
    return out


# ---------------------------------------------------------------------------------------------------
# loss level


class LogpsModel:
    """Stands in for the model inside TRL >= 1.6's _compute_loss. Every row is [marker, TARGET]: one scored
    position whose log-prob is the case's sequence log-prob (marker MATCHED_MARKER: the matched rows; KL_MARKER:
    the KL rows, which TRL asks for under no_grad). It answers the two ways TRL calls a model:
      fused_lm_head=True (TRL >= 1.15): per-token log-probs where the labels are not -100;
      otherwise (TRL <= 1.14): `.logits` over a 2-token vocabulary, [log(1 - p), log p] at the scored position,
      whose log-softmax at TARGET is log p with derivative 1 (the normaliser is 1 identically)."""

    def __init__(self, policy_logps, kl_policy_logps):
        self.policy_logps, self.kl_policy_logps = policy_logps, kl_policy_logps
        self.calls: list[str] = []

    def _logps(self, input_ids):
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] != 2:
            raise TRLUnavailable("TRL called the loss-level stand-in model without the [marker, target] rows it "
                                 f"was given (input_ids {None if input_ids is None else tuple(input_ids.shape)})")
        marker = int(input_ids[0, 0])
        if marker not in (MATCHED_MARKER, KL_MARKER):
            raise TRLUnavailable(f"TRL called the loss-level stand-in model on rows it did not build (marker "
                                 f"{marker})")
        return self.kl_policy_logps if marker == KL_MARKER else self.policy_logps

    def __call__(self, *args, input_ids=None, labels=None, fused_lm_head=False, **kwargs):
        import torch  # noqa: PLC0415

        if args:
            input_ids = args[0]
        logps = self._logps(input_ids)
        if fused_lm_head:
            self.calls.append("fused")
            if labels is None:
                raise TRLUnavailable("TRL called the fused LM head of the loss-level stand-in without labels")
            log_probs = logps[:, None] * (labels[:, 1:] != -100)
            zeros = torch.zeros_like(log_probs).detach()
            return _Output(log_probs=log_probs, entropy=zeros, mean_logits=zeros, log_sum_sq_probs=zeros,
                           is_top1=zeros)
        self.calls.append("logits")
        if bool((logps >= 0).any()):
            raise TRLUnavailable("the loss-level stand-in answers TRL's logits calls for log-probs < 0 only (a "
                                 "log-softmax cannot give more); the case has a log-prob >= 0")
        scored = torch.stack((torch.log(-torch.expm1(logps)), logps), dim=-1)  # [log(1 - p), log p]
        logits = torch.stack((scored, torch.zeros_like(scored)), dim=1)  # the last position is not scored
        return _Output(logits=logits)


class _Output:
    """A model output: the fields given, None for any other a trainer may read (aux_loss, loss, ...)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, name):
        return self.__dict__[name]


@functools.lru_cache(maxsize=4)
def _loss_trainer(loss_type: str):
    """A real KTOTrainer for the loss level, built once on the first model case's GPT-2 and its four rows."""
    from ..cases.reference import generate_cases, state_dict_from_inputs  # noqa: PLC0415

    api = trl_api()
    case = next(c for c in generate_cases() if c.kind == "model_kto")
    inputs = case.inputs
    n = len(inputs["labels"])
    rows = _rows(inputs["prompt_tokens"], inputs["completion_tokens"], inputs["completion_mask"], inputs["labels"],
                 np.zeros(n), np.zeros(n), ref_columns=api.ref_columns)
    output_dir = tempfile.mkdtemp(prefix="kto_np-trl-")
    trainer = _trainer(api, gpt2_model(state_dict_from_inputs(inputs), case.config), rows,
                       int(case.config["vocab_size"]), loss_type=loss_type, beta=0.1, desirable_weight=1.0,
                       undesirable_weight=1.0, output_dir=output_dir)
    trainer.precompute_ref_log_probs = trainer.precompute_ref_logps = True
    return trainer


@functools.lru_cache(maxsize=4)
def _loss_batch_keys(loss_type: str) -> tuple[str, ...]:
    """The keys of a batch from the loss trainer's own collator: what this TRL's _compute_loss reads."""
    trainer = _loss_trainer(loss_type)
    try:
        with _quiet(), _float64_default():
            batch = next(iter(trainer.get_train_dataloader()))
    except Exception as exc:  # noqa: BLE001
        raise TRLUnavailable(f"TRL {trl_api().version}'s collator raised on the loss trainer's rows "
                             f"({one_line(exc)})") from exc
    return tuple(batch)


def _torch(value):
    import torch  # noqa: PLC0415

    if hasattr(value, "detach"):
        return value
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def loss_batch(keys, labels, ref_logps, kl_ref_logps) -> dict:
    """A batch with the given keys (those of TRL's own collator) whose rows are the stand-in model's
    [marker, TARGET] rows; TRLUnavailable naming a key it cannot fill."""
    import torch  # noqa: PLC0415

    n = int(labels.shape[0])
    rows = {}
    for kl, marker in ((False, MATCHED_MARKER), (True, KL_MARKER)):
        ids = torch.tensor([[marker, TARGET]] * n, dtype=torch.int64)
        rows[kl] = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "completion_mask": torch.tensor([[0, 1]] * n, dtype=torch.int64)}
    batch = {}
    for key in keys:
        kl = key.startswith("KL_")
        base = key[3:] if kl else key
        if base.startswith("completion_") and base != "completion_mask":
            base = base[len("completion_"):]
        if key == "label":
            batch[key] = labels
        elif key in ("ref_logps", "reference_logps"):
            batch[key] = ref_logps
        elif key in ("ref_KL_logps", "reference_KL_logps"):
            batch[key] = kl_ref_logps
        elif base in rows[kl]:
            batch[key] = rows[kl][base].clone()
        elif base in ("prompt", "completion", "prompt_text", "completion_text"):
            continue  # text columns TRL passes through; its loss does not read them
        else:
            raise TRLUnavailable(f"TRL's batch carries {key!r}, which the loss-level stand-in does not fill")
    return batch


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
    if kl_policy_logps is None:  # no KL pairs: a zero KL estimate (z_ref = 0), from equal log-probs below 0
        kl_policy_logps = kl_ref_logps = torch.full((n,), NO_KL_LOGP, dtype=policy_logps.dtype)
    kl_policy_logps, kl_ref_logps = _torch(kl_policy_logps), _torch(kl_ref_logps)
    _clear_metrics(trainer)
    if api.api == "kto_loss":  # TRL <= 1.5: the split signature, on the real trainer
        with _quiet():
            losses, chosen_rewards, rejected_rewards, kl = trainer.kto_loss(
                policy_logps[labels], policy_logps[~labels], kl_policy_logps, ref_logps[labels],
                ref_logps[~labels], kl_ref_logps)
        metrics = {"kl": float(kl.reshape(-1)[0]) if loss_type == "kto" else 0.0,
                   "rewards/chosen": float(chosen_rewards.mean()) if chosen_rewards.numel() else None,
                   "rewards/rejected": float(rejected_rewards.mean()) if rejected_rewards.numel() else None}
        return {"loss": losses.nanmean(), **metrics}
    batch = loss_batch(_loss_batch_keys(loss_type), labels, ref_logps, kl_ref_logps)
    with _quiet():
        loss = trainer.compute_loss(LogpsModel(policy_logps, kl_policy_logps), batch)
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


def _first_case(kind: str, variant: str):
    """The level's first case, one with KL pairs where there is one (it exercises the most of TRL's path)."""
    from ..cases.reference import generate_cases  # noqa: PLC0415

    cases = [c for c in generate_cases() if c.kind == kind and c.variant == variant]
    return next((c for c in cases if "kl_policy_logps" in c.inputs), cases[0])


def _preflight(level: Level) -> None:
    """Run the level's candidate on its first case outside the oracle, so that whatever keeps this TRL from being
    driven surfaces once, as one line (TRLUnavailable), instead of as every case's error."""
    case = _first_case(level.kind, level.variant)
    arguments = dict(case.inputs)
    if level.kind == "model_kto":
        from ..cases.reference import state_dict_from_inputs  # noqa: PLC0415

        names = ("config", "prompt_tokens", "completion_tokens", "completion_mask", "labels", "ref_logps",
                 "kl_ref_logps", "beta", "desirable_weight", "undesirable_weight")
        arguments = {"state_dict": state_dict_from_inputs(case.inputs), "config": case.config,
                     **{k: case.inputs[k] for k in names[1:] if k in case.inputs}}
    else:
        import torch  # noqa: PLC0415

        arguments = {k: (torch.tensor(np.array(v)) if isinstance(v, np.ndarray) else v)
                     for k, v in arguments.items()}
    try:
        level.candidate(**arguments)
    except TRLUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - TRL raising with no numbers to judge is "cannot drive"
        raise TRLUnavailable(f"TRL {trl_api().version} raised on case {case.name} before giving any number "
                             f"({one_line(exc)})") from exc


def _undriven(report) -> str | None:
    """Why a report that did not pass carries no verdict: cases raised and every number compared agreed."""
    if report.passed or not report.errors:
        return None
    if any(not c.passed for c in report.checks if not c.skipped):
        return None  # wrong numbers: a verdict
    case, message = next(iter(report.errors.items()))
    return (f"TRL raised on {len(report.errors)} of {len(report.cases)} cases, giving no numbers there (first: "
            f"{case}: {' '.join(message.split())})")


def run_trl(levels=("loss", "model"), *, out=None) -> int:
    """Check the installed TRL at the given levels, print each report; 0 pass, 1 fail, 2 TRL cannot be driven
    (the cause on one line of standard error per level not driven)."""
    from ..check import verify  # noqa: PLC0415

    out = out or sys.stdout
    try:
        api = trl_api()
    except TRLUnavailable as exc:
        print(f"kto-np oracle trl: {exc}", file=sys.stderr)
        return 2
    print(f"{api.describe}; transformers {_version_of('transformers')}, torch {_version_of('torch')}; offline "
          "(HF_HUB_OFFLINE=1)", file=out)
    verdicts = []
    for level in [lv for name in levels for lv in LEVELS[name]]:
        tolerance = "float64"
        if level.kind == "model_kto" and float32_points(api):
            tolerance = "float32"
        try:
            _preflight(level)
            report = verify(level.candidate, level.kind, level.variant, tolerance=tolerance, isolate=False)
            cause = _undriven(report)
        except TRLUnavailable as exc:
            if exc.every_level:  # no level can run: said once
                print(f"kto-np oracle trl: {exc}", file=sys.stderr)
                verdicts.append(("(every level)", None))
                break
            cause = str(exc)
        if cause is not None:
            print(f"kto-np oracle trl: TRL {api.version} {level.label} not driven: {cause}", file=sys.stderr)
            verdicts.append((level.label, None))
            continue
        report.notes = [("ran in this process: TRL's installed code, driven by kto_np (not a candidate to isolate)"
                         if note.startswith("not isolated:") else note) for note in report.notes]
        print(f"== {level.label}", file=out)
        if tolerance == "float32":
            print("TRL computes in float32 here, for a float64 model: " + "; ".join(float32_points(api))
                  + ". Checked at float32 tolerance.", file=out)
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
