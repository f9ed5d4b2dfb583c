"""Fuzzing every public function, one bad argument at a time (issue 15, item 8).

Each entry point has a valid call. A mutation replaces ONE argument with a bad (or merely unusual)
value: NaN, infinities, huge-but-finite numbers, 10**400, complex numbers, strings, 0-d string arrays,
float16 and complex arrays, masks that are not 0/1, wrong shapes, NumPy integer sizes, torch tensors
that require grad, non-models, another model's cache, ... The call must then either

  * raise a ValueError or TypeError from kto_np's own code whose message names the argument, or
  * return finite numbers, and for a mutation that only changes the type of a valid value (np.float32(0.1)
    for 0.1, a list for an array, np.int64(8) for 8) the same numbers as the valid call.

Anything else is a bad outcome: another exception, an error raised inside NumPy/json/tempfile, a
warning (overflow, casting), a NaN or infinity in the result, a different answer. `sweep()` runs every
(function, argument, mutation) triple once and counts; the Hypothesis test draws further values.
"""

from __future__ import annotations

import copy
import os
import signal
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import kto_np
from kto_np import checkpoint, optim, step
from kto_np.architectures import build
from kto_np.dpo import dpo_loss, dpo_loss_and_grad
from kto_np.generate import generate
from kto_np.losses import KTOConfig, check_balance, kto_loss, kto_loss_and_grad
from kto_np.model import GPT

try:
    import torch
except ImportError:  # the torch mutations are left out
    torch = None

CALL_SECONDS = 2.0  # one call that takes longer is a finding (unbounded work for a small input)
PACKAGE_DIR = os.path.dirname(os.path.abspath(kto_np.__file__))
EQUIVALENT = "equivalent"  # a mutation that keeps the value: the answer must not change
REJECT = "reject"  # a value that has no right answer: it must be rejected


# ----------------------------------------------------------------------------------------------
# the valid calls


def _model():
    return build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, dropout=0.0, max_seq_len=8,
                 dtype="float64")


MODEL = _model()
PARAMS = MODEL.init(0)
OTHER_MODEL = build(hidden_size=12, num_layers=1, num_heads=3, vocab_size=11, dropout=0.0, max_seq_len=8,
                    dtype="float64")
_rng = np.random.default_rng(0)
TOKENS = _rng.integers(0, 11, size=(2, 5))
LOGITS, CACHE = MODEL.forward(PARAMS, TOKENS)
_, OTHER_CACHE = OTHER_MODEL.forward(OTHER_MODEL.init(0), TOKENS)
DLOGITS = _rng.normal(size=LOGITS.shape)
POLICY, REF = _rng.normal(-5, 1, 4), _rng.normal(-5, 1, 4)
KL_POLICY, KL_REF = _rng.normal(-5, 1, 4), _rng.normal(-5, 1, 4)
LABELS = np.array([1, 0, 1, 0])
SMALL_LOGITS = _rng.normal(size=(2, 3, 5))
TARGETS = _rng.integers(0, 5, size=(2, 3))
MASK = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
BATCH = step.make_batch([[1, 2], [3, 4, 5], [6], [7, 8]], [[9, 10], [2], [3, 4], [5]], [1, 0, 1, 0],
                        dtype="float64")
REF_LOGPS, KL_REF_LOGPS = step.reference_logps(MODEL, PARAMS, BATCH)
GRADS = {k: _rng.normal(size=v.shape) for k, v in PARAMS.items()}


@dataclass
class EntryPoint:
    name: str
    call: callable  # call(**kwargs)
    kwargs: dict  # the valid call
    kinds: dict  # argument -> kind (which mutations apply)
    aliases: dict = field(default_factory=dict)  # argument -> other names its messages may use

    def valid(self) -> dict:
        return {k: v if isinstance(v, GPT) else copy.deepcopy(v) for k, v in self.kwargs.items()}


def _save(path, params, config, extra):
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(os.path.join(folder, path), params, config, extra=extra)
        return 0.0


def _build_and_save(**kwargs):
    model = build(**kwargs)
    params = model.init(0)
    _save("ckpt.npz", params, model.config, None)
    return model.num_params()


def _adamw(params, grads, state, lr, betas, eps, weight_decay):
    optim.adamw_step(params, grads, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return params


def _generate(model, params, prompt_tokens, max_new_tokens, temperature, top_k, rng):
    return generate(model, params, prompt_tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                    rng=rng)


def _init(seed):
    return MODEL.init(seed)


def _forward(params, tokens):
    return MODEL.forward(params, tokens)[0]


def _backward(dlogits, cache):
    return MODEL.backward(dlogits, cache)


def _kto_step(model, params, batch, ref_logps, kl_ref_logps, config):
    loss, metrics, grads = step.kto_step(model, params, batch, ref_logps, kl_ref_logps, config)
    return loss, grads


def _make_batch(prompt_ids, completion_ids, labels, pad_id, dtype):
    return step.make_batch(prompt_ids, completion_ids, labels, pad_id=pad_id, dtype=dtype)


def _learning_rate(step, base_lr, warmup_steps, total_steps, schedule, min_lr_ratio):
    return optim.learning_rate(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps,
                               schedule=schedule, min_lr_ratio=min_lr_ratio)


KTO_KWARGS = dict(policy_logps=POLICY, ref_logps=REF, labels=LABELS, beta=0.1, desirable_weight=1.0,
                  undesirable_weight=1.0, variant="kto", stop_z_grad=False, kl_policy_logps=KL_POLICY,
                  kl_ref_logps=KL_REF, warn_balance=False)
KTO_KINDS = dict(policy_logps="logps", ref_logps="logps", labels="labels", beta="positive", desirable_weight="weight",
                 undesirable_weight="weight", variant="choice", stop_z_grad="bool", kl_policy_logps="logps",
                 kl_ref_logps="logps")
DPO_KWARGS = dict(policy_chosen_logps=POLICY, policy_rejected_logps=KL_POLICY, ref_chosen_logps=REF,
                  ref_rejected_logps=KL_REF, beta=0.1)
DPO_KINDS = dict(policy_chosen_logps="logps", policy_rejected_logps="logps", ref_chosen_logps="logps",
                 ref_rejected_logps="logps", beta="positive")
BUILD_KWARGS = dict(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, dropout=0.1, max_seq_len=8,
                    dtype="float32", positional="learned", tie_embeddings=True)

ENTRY_POINTS = [
    EntryPoint("kto_loss", kto_loss, KTO_KWARGS, KTO_KINDS),
    EntryPoint("kto_loss_and_grad", kto_loss_and_grad, KTO_KWARGS, KTO_KINDS),
    EntryPoint("kto_loss[edifice]", kto_loss, {**KTO_KWARGS, "variant": "edifice", "kl_policy_logps": None,
                                               "kl_ref_logps": None},
               {k: v for k, v in KTO_KINDS.items() if not k.startswith("kl_")}),
    EntryPoint("dpo_loss", dpo_loss, DPO_KWARGS, DPO_KINDS),
    EntryPoint("dpo_loss_and_grad", dpo_loss_and_grad, DPO_KWARGS, DPO_KINDS),
    EntryPoint("check_balance", lambda **kw: check_balance(**kw) or 0.0,
               dict(labels=LABELS, desirable_weight=1.0, undesirable_weight=1.0),
               dict(labels="labels", desirable_weight="weight", undesirable_weight="weight")),
    EntryPoint("KTOConfig", lambda **kw: KTOConfig(**kw).beta,
               dict(variant="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, stop_z_grad=False),
               dict(variant="choice", beta="positive", desirable_weight="weight", undesirable_weight="weight",
                    stop_z_grad="bool")),
    EntryPoint("compute_logprobs", kto_np.compute_logprobs, dict(logits=SMALL_LOGITS, targets=TARGETS, mask=MASK),
               dict(logits="logits", targets="tokens", mask="mask"), {"logits": ["targets"]}),
    EntryPoint("sequence_logprobs", kto_np.sequence_logprobs,
               dict(logits=SMALL_LOGITS, tokens=TARGETS, completion_mask=MASK),
               dict(logits="logits", tokens="tokens", completion_mask="mask"), {"logits": ["tokens"]}),
    EntryPoint("build", lambda **kw: build(**kw).num_params(), BUILD_KWARGS,
               dict(hidden_size="size", num_layers="size", num_heads="size", vocab_size="size", dropout="fraction",
                    max_seq_len="size", dtype="dtype", positional="choice", tie_embeddings="bool")),
    EntryPoint("build+checkpoint.save", _build_and_save, {**BUILD_KWARGS, "dtype": "float64"},
               dict(hidden_size="size", num_layers="size", num_heads="size", vocab_size="size", dropout="fraction",
                    max_seq_len="size")),
    EntryPoint("GPT.init", _init, dict(seed=0), dict(seed="seed")),
    EntryPoint("GPT.forward", _forward, dict(params=PARAMS, tokens=TOKENS), dict(params="params", tokens="tokens")),
    EntryPoint("GPT.backward", _backward, dict(dlogits=DLOGITS, cache=CACHE), dict(dlogits="dlogits", cache="cache")),
    EntryPoint("generate", _generate, dict(model=MODEL, params=PARAMS, prompt_tokens=TOKENS[:, :3], max_new_tokens=3,
                                          temperature=1.0, top_k=3, rng=np.random.default_rng(0)),
               dict(model="model", params="params", prompt_tokens="tokens", max_new_tokens="size",
                    temperature="nonnegative", top_k="optional_size", rng="rng"),
               {"prompt_tokens": ["tokens"], "model": ["params"]}),
    EntryPoint("clip_grad_norm", optim.clip_grad_norm, dict(grads=GRADS, max_norm=1.0),
               dict(grads="params", max_norm="positive")),
    EntryPoint("adamw_step", _adamw, dict(params=PARAMS, grads=GRADS, state=optim.adamw_init(PARAMS), lr=1e-3,
                                          betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
               dict(params="params", grads="params", lr="nonnegative", eps="positive", weight_decay="nonnegative",
                    state="state")),
    EntryPoint("learning_rate", _learning_rate, dict(step=3, base_lr=1e-3, warmup_steps=2, total_steps=10,
                                                     schedule="cosine", min_lr_ratio=0.1),
               dict(step="count", base_lr="nonnegative", warmup_steps="count", total_steps="size",
                    schedule="choice", min_lr_ratio="fraction")),
    EntryPoint("checkpoint.save", _save, dict(path="ckpt.npz", params=PARAMS, config=MODEL.config,
                                              extra={"step": 3}),
               dict(params="params", config="config", extra="extra")),
    EntryPoint("kto_step", _kto_step, dict(model=MODEL, params=PARAMS, batch=BATCH, ref_logps=REF_LOGPS,
                                           kl_ref_logps=KL_REF_LOGPS, config=KTOConfig()),
               dict(model="model", params="params", ref_logps="logps", kl_ref_logps="logps", config="config"),
               {"model": ["params"], "params": ["logits"]}),
    EntryPoint("make_batch", _make_batch, dict(prompt_ids=[[1, 2], [3]], completion_ids=[[4], [5, 6]],
                                               labels=[1, 0], pad_id=0, dtype="float64"),
               dict(prompt_ids="id_lists", completion_ids="id_lists", labels="labels", pad_id="count",
                    dtype="dtype")),
]


# ----------------------------------------------------------------------------------------------
# the mutations: kind -> [(label, value or function of the valid value, equivalent?)]


def _torch_grad(value):
    return torch.tensor(np.asarray(value, dtype=np.float64), requires_grad=True)


def _torch(value):
    return torch.tensor(np.asarray(value))


def _with(value, index, x):
    out = np.array(value, dtype=np.float64, copy=True)
    out.flat[index] = x
    return out


SCALAR_MUTATIONS = [
    ("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf")), ("1e308", 1e308), ("1.7e308", 1.7e308),
    ("-1e308", -1e308), ("5e-324", 5e-324), ("0", 0.0), ("-1", -1.0), ("10**400", 10**400), ("complex", 1 + 1j),
    ("np.complex128", np.complex128(0.1)),
    ("str", "0.1", REJECT), ("0-d str array", np.array("0.1"), REJECT), ("None", None),
    ("list", [0.1]), ("2-element array", np.array([0.1, 0.2])), ("True", True), ("object", object()),
    ("np.float32", lambda v: np.float32(v)), ("np.float64", lambda v: np.float64(v), EQUIVALENT),
    ("np.float16 max", np.float16(65504)), ("0-d array", lambda v: np.array(v), EQUIVALENT),
    ("np.int64", np.int64(1)), ("torch requires_grad", lambda v: _torch_grad(v) if torch else None),
]
ARRAY_MUTATIONS = [
    ("NaN entry", lambda v: _with(v, 0, np.nan)), ("inf entry", lambda v: _with(v, 0, np.inf)),
    ("1e308 entry", lambda v: _with(v, 0, 1e308)), ("-1e308 entry", lambda v: _with(v, 0, -1e308)),
    ("1.7e308 all", lambda v: np.full(np.shape(v), 1.7e308)),
    ("-1.7e308 all", lambda v: np.full(np.shape(v), -1.7e308)),
    ("float16", lambda v: np.asarray(v).astype(np.float16)),
    ("float16 huge", lambda v: _with(v, 0, 6e4).astype(np.float16)),
    ("complex", lambda v: np.asarray(v).astype(np.complex128)), ("one short", lambda v: np.asarray(v)[..., :-1]),
    ("extra axis", lambda v: np.asarray(v)[None]), ("empty", np.zeros(0)), ("0-d", np.float64(0.5)),
    ("list", lambda v: np.asarray(v).tolist(), EQUIVALENT), ("str array", lambda v: np.asarray(v).astype(str)),
    ("object array", lambda v: np.asarray(v).astype(object)), ("None", None), ("str", "abc"),
    ("torch requires_grad", lambda v: _torch_grad(v) if torch else None),
    ("torch", lambda v: _torch(v) if torch else None),
    ("float32", lambda v: np.asarray(v).astype(np.float32)),
]
LABEL_MUTATIONS = [
    ("2", lambda v: _with(v, 0, 2), REJECT), ("-1", lambda v: _with(v, 0, -1), REJECT),
    ("0.5", lambda v: _with(v, 0, 0.5), REJECT),
    ("nan", lambda v: _with(v, 0, np.nan)), ("str", lambda v: np.asarray(v).astype(str)),
    ("one short", lambda v: np.asarray(v)[:-1]), ("2-D", lambda v: np.asarray(v)[None]), ("None", None),
    ("bool", lambda v: np.asarray(v).astype(bool), EQUIVALENT),
    ("float", lambda v: np.asarray(v, dtype=float), EQUIVALENT),
    ("complex", lambda v: np.asarray(v).astype(complex)), ("object", object()),
    ("torch requires_grad", lambda v: _torch_grad(v) if torch else None),
]
MASK_MUTATIONS = [
    ("-1 entry", lambda v: _with(v, 0, -1.0), REJECT), ("2 entry", lambda v: _with(v, 0, 2.0), REJECT),
    ("0.5 entry", lambda v: _with(v, 0, 0.5)),  # a weight: masks in [0, 1] are accepted
    ("nan entry", lambda v: _with(v, 0, np.nan)),
    ("1e308 entry", lambda v: _with(v, 0, 1e308)), ("wrong shape", lambda v: np.asarray(v)[:, :-1]),
    ("bool", lambda v: np.asarray(v).astype(bool), EQUIVALENT),
    ("int", lambda v: np.asarray(v).astype(int), EQUIVALENT),
    ("str", lambda v: np.asarray(v).astype(str)), ("complex", lambda v: np.asarray(v).astype(complex)),
    ("None", None), ("torch requires_grad", lambda v: _torch_grad(v) if torch else None),
]
TOKEN_MUTATIONS = [
    ("negative", lambda v: np.where(np.arange(np.size(v)).reshape(np.shape(v)) == 0, -1, v)),
    ("too large", lambda v: np.where(np.arange(np.size(v)).reshape(np.shape(v)) == 0, 10**6, v)),
    ("float", lambda v: np.asarray(v, dtype=float)), ("1-D", lambda v: np.asarray(v)[0]),
    ("3-D", lambda v: np.asarray(v)[None]), ("empty", np.zeros((0, 3), dtype=int)),
    ("str", lambda v: np.asarray(v).astype(str)), ("None", None), ("object", object()),
    ("int32", lambda v: np.asarray(v).astype(np.int32), EQUIVALENT),
    ("list", lambda v: np.asarray(v).tolist(), EQUIVALENT),
    ("bool", lambda v: np.asarray(v).astype(bool)), ("uint64 huge", lambda v: np.full(np.shape(v), 2**63, np.uint64)),
    ("torch", lambda v: _torch(v) if torch else None),
]
SIZE_MUTATIONS = [
    ("0", 0), ("-1", -1), ("1.5", 1.5), ("True", True), ("str", "3"), ("None", None), ("10**400", 10**400),
    ("2**63", 2**63), ("10**7", 10**7), ("nan", float("nan")), ("np.int64", lambda v: np.int64(v), EQUIVALENT),
    ("np.int32", lambda v: np.int32(v), EQUIVALENT), ("np.uint8", lambda v: np.uint8(v), EQUIVALENT),
    ("float", lambda v: float(v)), ("0-d array", lambda v: np.array(v)), ("complex", lambda v: complex(v)),
]
COUNT_MUTATIONS = [(label, value, *rest) for label, value, *rest in SIZE_MUTATIONS if label not in ("0", "10**7")]
CHOICE_MUTATIONS = [("bogus", "bogus"), ("None", None), ("int", 3), ("bytes", lambda v: str(v).encode()), ("", ""),
                    ("upper", lambda v: str(v).upper()), ("0-d str array", lambda v: np.array(v)),
                    ("list", lambda v: [v])]
DTYPE_MUTATIONS = CHOICE_MUTATIONS + [("float16", "float16"), ("np.float64 type", np.float64),
                                      ("int64", "int64"), ("np.dtype", lambda v: np.dtype(v))]
BOOL_MUTATIONS = [("0", 0), ("1", 1), ("str", "yes"), ("None", None), ("np.bool_", lambda v: np.bool_(v), EQUIVALENT),
                  ("array", lambda v: np.array([v, v]))]
MODEL_MUTATIONS = [("None", None), ("object", object()), ("other model", OTHER_MODEL), ("config", MODEL.config),
                   ("params dict", PARAMS)]
PARAMS_MUTATIONS = [
    ("missing key", lambda v: {k: x for k, x in list(v.items())[1:]}),
    ("extra key", lambda v: {**v, "bogus.weight": np.zeros(3)}),
    ("wrong shape", lambda v: {k: (x[..., :-1] if i == 0 else x) for i, (k, x) in enumerate(v.items())}),
    ("NaN entry", lambda v: {k: (_with(x, 0, np.nan) if i == 0 else x) for i, (k, x) in enumerate(v.items())}),
    ("1e308 entry", lambda v: {k: (_with(x, 0, 1e308) if i == 0 else x) for i, (k, x) in enumerate(v.items())}),
    ("1e308 all", lambda v: {k: np.full(x.shape, 1e308) for k, x in v.items()}),
    ("float16", lambda v: {k: x.astype(np.float16) for k, x in v.items()}),
    ("float32", lambda v: {k: x.astype(np.float32) for k, x in v.items()}),
    ("complex", lambda v: {k: x.astype(np.complex128) for k, x in v.items()}),
    ("list values", lambda v: {k: x.tolist() for k, x in v.items()}), ("list", lambda v: list(v.values())),
    ("None", None), ("empty dict", {}),
    ("torch requires_grad", lambda v: {k: _torch_grad(x) for k, x in v.items()} if torch else None),
]
CACHE_MUTATIONS = [("other model's cache", OTHER_CACHE), ("None", None), ("tuple", ()), ("object", object())]
RNG_MUTATIONS = [("int", 3), ("str", "seed"), ("legacy RandomState", np.random.RandomState(0)), ("object", object())]
STATE_MUTATIONS = [("None", None),
                   ("missing v", lambda v: {"step": 0, "m": v["m"]}), ("step -1", lambda v: {**v, "step": -1}),
                   ("step float", lambda v: {**v, "step": 0.5}), ("m of other shape", lambda v: {**v, "m": {}})]
EXTRA_MUTATIONS = [("nan value", {"x": float("nan")}), ("object", {"x": object()}), ("int key", {1: 2}),
                   ("set", {"x": {1, 2}}), ("huge int", {"x": 10**400}), ("object array", {"x": np.array([None])}),
                   ("list", [1, 2]), ("reserved key", {"__array__": 1}), ("bad path key", {"a/b": np.zeros(2)})]
CONFIG_MUTATIONS = [("None", None), ("dict", lambda v: v.to_dict() if hasattr(v, "to_dict") else {}),
                    ("object", object()), ("other model's config", OTHER_MODEL.config)]
ID_LIST_MUTATIONS = [("negative id", [[-1], [2]]), ("float id", [[1.5], [2]]), ("str", "12"), ("None", None),
                     ("one short", [[1]]), ("empty rows", [[], []]), ("nested deeper", [[[1]], [[2]]]),
                     ("huge id", [[2**70], [1]]), ("np.int64 ids", [[np.int64(1), np.int64(2)], [np.int64(3)]])]

MUTATIONS = {
    "logps": ARRAY_MUTATIONS, "logits": ARRAY_MUTATIONS, "dlogits": ARRAY_MUTATIONS,
    "positive": SCALAR_MUTATIONS, "weight": SCALAR_MUTATIONS, "nonnegative": SCALAR_MUTATIONS,
    "fraction": SCALAR_MUTATIONS, "labels": LABEL_MUTATIONS, "mask": MASK_MUTATIONS, "tokens": TOKEN_MUTATIONS,
    "size": SIZE_MUTATIONS, "count": COUNT_MUTATIONS, "seed": COUNT_MUTATIONS,
    "optional_size": SIZE_MUTATIONS, "choice": CHOICE_MUTATIONS, "dtype": DTYPE_MUTATIONS, "bool": BOOL_MUTATIONS,
    "model": MODEL_MUTATIONS, "params": PARAMS_MUTATIONS, "cache": CACHE_MUTATIONS, "rng": RNG_MUTATIONS,
    "state": STATE_MUTATIONS, "extra": EXTRA_MUTATIONS, "config": CONFIG_MUTATIONS, "id_lists": ID_LIST_MUTATIONS,
}


# ----------------------------------------------------------------------------------------------
# running one call and judging its outcome


def _numbers(value):
    """Every number in a result, as float64 arrays (dicts, tuples, NamedTuples, torch tensors, scalars)."""
    if value is None or isinstance(value, (str, bool)):
        return []
    if isinstance(value, dict):
        return [a for v in value.values() for a in _numbers(v)]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _numbers(v)]
    if hasattr(value, "detach"):
        value = value.detach().numpy()
    if isinstance(value, (int, float, np.number, np.ndarray)):
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return [array.astype(np.float64)]
        return [np.array([np.nan])]  # complex or other: not a real answer
    return []


def _same(a, b) -> bool:
    one, two = _numbers(a), _numbers(b)
    return len(one) == len(two) and all(x.shape == y.shape and np.allclose(x, y, rtol=2e-6, atol=1e-12)
                                        for x, y in zip(one, two))


def _raised_by_us(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR)


class _TookTooLong(Exception):
    pass


def _alarm(signum, frame):
    raise _TookTooLong


def judge(entry: EntryPoint, argument: str, value, equivalent, baseline) -> str:
    """ "rejected" (a named ValueError/TypeError of ours), "accepted" (a finite, right answer) or the
    reason the outcome is bad."""
    kwargs = entry.valid()
    kwargs[argument] = value if isinstance(value, GPT) or type(value) is object else copy.deepcopy(value)
    previous = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    if previous is not None:
        signal.setitimer(signal.ITIMER_REAL, CALL_SECONDS)
    try:
        return _judge(entry, argument, kwargs, equivalent, baseline)
    except _TookTooLong:
        return f"took more than {CALL_SECONDS} s"
    finally:
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _judge(entry: EntryPoint, argument: str, kwargs: dict, equivalent, baseline) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", UserWarning)  # ours, deliberate (check_balance's range)
        try:
            result = entry.call(**kwargs)
        except (ValueError, TypeError) as exc:
            names = [argument, *entry.aliases.get(argument, [])]
            if not _raised_by_us(exc):
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                return f"{type(exc).__name__} from {os.path.basename(frame.filename)}: {exc}"[:300]
            if not any(name in str(exc) for name in names):
                return f"{type(exc).__name__} not naming {argument!r}: {exc}"[:300]
            if "got 0 NaN or infinite" in str(exc):
                return f"misleading message: {exc}"[:300]
            return "rejected"
        except _TookTooLong:
            raise
        except Exception as exc:  # noqa: BLE001 - every other exception is a finding
            return f"{type(exc).__name__}: {exc}"[:300]
    numbers = _numbers(result)
    if not all(np.isfinite(a).all() for a in numbers):
        return "accepted with a NaN or infinite result"
    if equivalent == REJECT:
        return "accepted a value that has no right answer"
    if equivalent == EQUIVALENT and not _same(result, baseline):
        return "accepted with a different answer than the equivalent valid value"
    return "accepted"


# documented non-finite answers: (function, argument, mutation) -> why that is the right answer
DOCUMENTED = {
    ("clip_grad_norm", "grads", "NaN entry"): "NaN gradients give a NaN norm, returned for the caller to decide",
    ("clip_grad_norm", "grads", "1e308 all"): "the norm, 1e308 * sqrt(n), is beyond the float range: inf",
    ("check_balance", "undesirable_weight", "0"): "lambda_U = 0: the balance is infinite (documented)",
    ("check_balance", "undesirable_weight", "5e-324"): "the ratio is beyond the float range: inf",
    ("check_balance", "desirable_weight", "1e308"): "the ratio 1e308 * n_D / n_U is beyond the float range",
    ("check_balance", "desirable_weight", "1.7e308"): "the ratio is beyond the float range: inf",
}
SLOW = {("build+checkpoint.save", "vocab_size", "10**7")}  # a valid model of 80 M parameters: right, but slow


def _triples():
    for entry in ENTRY_POINTS:
        for argument, kind in entry.kinds.items():
            for label, value, *rest in MUTATIONS[kind]:
                if (entry.name, argument, label) not in SLOW:
                    yield entry, argument, label, value, rest[0] if rest else None


def sweep():
    """Every (function, argument, mutation) once: (calls, rejected, accepted, {triple: reason})."""
    baselines = {entry.name: entry.call(**entry.valid()) for entry in ENTRY_POINTS}
    calls = rejected = accepted = 0
    bad = {}
    for entry, argument, label, value, equivalent in _triples():
        if callable(value) and not isinstance(value, type):
            value = value(entry.kwargs[argument])
            if value is None and label.startswith("torch"):
                continue
        calls += 1
        outcome = judge(entry, argument, value, equivalent, baselines[entry.name])
        if outcome == "rejected":
            rejected += 1
        elif outcome == "accepted" or (outcome.startswith("accepted with a NaN")
                                       and (entry.name, argument, label) in DOCUMENTED):
            accepted += 1
        else:
            bad[(entry.name, argument, label)] = outcome
    return calls, rejected, accepted, bad


def test_every_public_function_rejects_by_name_or_answers_right():
    calls, rejected, accepted, bad = sweep()
    assert calls > 500
    assert not bad, f"{len(bad)} bad outcomes in {calls} calls:\n" + "\n".join(
        f"{name}({argument}={label}): {reason}" for (name, argument, label), reason in sorted(bad.items()))


def test_the_valid_calls_are_valid():
    for entry in ENTRY_POINTS:
        assert _numbers(entry.call(**entry.valid())), entry.name


REAL_ARGUMENTS = [(entry, argument) for entry in ENTRY_POINTS for argument, kind in entry.kinds.items()
                  if kind in ("positive", "weight", "nonnegative", "fraction")]
ARRAY_ARGUMENTS = [(entry, argument) for entry in ENTRY_POINTS for argument, kind in entry.kinds.items()
                   if kind in ("logps", "logits", "dlogits")]


@settings(max_examples=150)
@given(data=st.data())
def test_drawn_values_are_rejected_by_name_or_answered_right(data):
    if data.draw(st.booleans(), label="array argument"):
        entry, argument = data.draw(st.sampled_from(ARRAY_ARGUMENTS), label="argument")
        valid = np.asarray(entry.kwargs[argument])
        scale = data.draw(st.sampled_from([1.0, 1e4, 1e150, 1e300, 1.7e308]), label="scale")
        values = data.draw(st.lists(st.floats(-1.0, 1.0), min_size=valid.size, max_size=valid.size), label="values")
        value = (np.array(values) * scale).reshape(valid.shape)
    else:
        entry, argument = data.draw(st.sampled_from(REAL_ARGUMENTS), label="argument")
        value = data.draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                                    st.integers(-10**400, 10**400), st.complex_numbers(max_magnitude=1e300)),
                          label="value")
    outcome = judge(entry, argument, value, None, None)
    assert outcome in ("rejected", "accepted"), f"{entry.name}({argument}={value!r}): {outcome}"


if __name__ == "__main__":  # python tests/test_fuzz.py: the counts (memory capped at 4 GB)
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    calls, rejected, accepted, bad = sweep()
    print(f"{calls} calls: {rejected} named rejections, {accepted} finite right answers, {len(bad)} bad outcomes")
    for (name, argument, label), reason in sorted(bad.items()):
        print(f"  {name}({argument}={label}): {reason}")
