"""Loss landscapes of a trained policy: the loss of the user's own model on a fixed batch of its own
data, around the trained parameters, along the way from the reference, along the path training took,
and along the directions of largest curvature. A tool: it calls the core, the core never calls it.

Every evaluation is in float64 (the run's checkpoints are cast), forward only, on one fixed batch.

The landscapes (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", and the curvature view):
  random    L(θ* + α d1 + β d2) for two filter-normalised Gaussian directions d1, d2 around the policy
            θ* (at α = β = 0). Filter normalisation: each filter of d (one output unit of a weight
            matrix: a column of the [in, out] weights x @ W, a row of the embedding tables wte / wpe and
            of lm_head) is rescaled to the norm of the same filter of θ*. Biases and LayerNorm
            parameters (every 1-D tensor) are set to zero in the direction, as in the paper's
            experiments: the plane moves the weight matrices only.
  pca       the plane of the first two principal directions of the saved trajectory θ_0 (reference),
            θ_k (trajectory/kto_step_*.npz), θ_n (policy): SVD of the rows θ_i - θ_n (paper, Sec. 7),
            unit-norm directions, the trajectory drawn at its projections (θ_i - θ_n)·d.
  hessian   the top two eigen-directions of the Hessian of the loss at θ*, by power iteration with
            deflation on Hessian-vector products. The products are central finite differences of our
            exact gradients in float64: H v ≈ (g(θ + h v̂) - g(θ - h v̂)) / (2 h) |v|, v̂ = v / |v|,
            with a displacement of norm h = HVP_STEP = 1e-5 (truncation error O(h²), rounding about
            1e-16 |g| / h ≈ 1e-11 |g|). Power iteration finds the eigenvalues of largest magnitude.
            Each unit eigenvector v_k is scaled to length sqrt(2 ΔL / |λ_k|), ΔL = max(|L(θ*)|, 0.1):
            at a span of 1 the quadratic model ½ λ_k α² |d_k|² has risen by ΔL, so the figure shows
            where the loss leaves its quadratic model.
  interpolation   L(θ_ref + t (θ* - θ_ref)) for t in [-0.5, 1.5], next to the desirable rate of
            completions sampled from the interpolated model.
  shift     the invariance: L as a function of (t, c), where c is a constant added to EVERY policy
            log-probability the loss sees (matched rows and, for "kto", the KL rows), the log-probs
            themselves computed by the model at θ(t). This is the direction, in log-probability
            space, that lowers or raises all log-probabilities equally. The seed formula
            ("edifice", z = mean β r over the same batch) is exactly flat along c everywhere;
            "apo_zero_unpaired" (no z) is anchored at r = 0 and slopes; "kto" is anchored by its clamp
            z_ref = max(0, mean KL-row log-ratio): flat along c only while that mean (+ c) stays above 0,
            sloped where z_ref is clamped at 0 (as at the demo's policy, whose KL-row mean is -32 nats).
            logprob_shift_direction gives the matching parameter-space direction (minimum norm d
            with J d = 1 for the Jacobian J of the log-probs): along it the edifice loss has zero
            slope (to first order), which the tests check through the model.

Loss variants: "edifice", "kto", "apo_zero_unpaired" (kto_np.losses), "edifice_stop_z_grad", "dpo",
"sft". "edifice_stop_z_grad" has the edifice loss's value but trains on a different gradient; what
that gradient descends is the edifice loss with z held at its value z0 at the centre (the policy), and
that surrogate is what is drawn for it (its gradient at the centre is step.kto_step's with
KTOConfig("edifice", stop_z_grad=True)). It is computed by the library as apo_zero_unpaired against the
reference log-probs shifted by z0/β, minus the mean weight (make_problem has the identity). Every value
and gradient comes from kto_np.losses and kto_np.step; the one addition is "kto"'s gradient path
through z_ref, which training detaches and a landscape of the loss value needs. "dpo" needs prompts
that appear in the batch with a desirable and an undesirable completion (pairs); "sft" is the mean
negative log-likelihood per token of the desirable completions (step.sft_step on those rows).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from .backend import to_numpy
from .checkpoint import CheckpointError, load
from .data import Batch, Tokenizer, collate, make_task
from .dpo import dpo_loss, dpo_loss_and_grad
from .files import write_npz
from .logprobs import sequence_logprobs_backward
from .losses import VARIANTS as KTO_VARIANTS
from .losses import KTOConfig
from .model import GPT
from .step import completion_logps, forward_logps, kto_step, reference_logps, sft_step
from .train import TRAJECTORY_DIR, TrainConfig, evaluate, heldout_prompts, kto_examples
from .validation import check_choice, check_positive_int

__all__ = [
    "COMPARISON_VARIANTS",
    "DIRECTIONS",
    "HVP_STEP",
    "LOSS_VARIANTS",
    "MAX_POINTS",
    "MIN_POINTS",
    "Landscape",
    "LandscapeError",
    "LossProblem",
    "RunStates",
    "filter_normalize",
    "hessian_directions",
    "hessian_vector_product",
    "interpolation_losses",
    "landscape_grid",
    "load_run",
    "logprob_shift_direction",
    "loss_and_grad",
    "loss_value",
    "make_problem",
    "pca_directions",
    "plot_interpolation",
    "plot_landscape",
    "plot_variant_comparison",
    "power_iteration",
    "random_direction",
    "run_landscape",
    "shift_losses",
]

LOSS_VARIANTS = ("edifice", "edifice_stop_z_grad", "kto", "apo_zero_unpaired", "dpo", "sft")
COMPARISON_VARIANTS = ("edifice", "edifice_stop_z_grad", "kto", "apo_zero_unpaired")
DIRECTIONS = ("random", "pca", "hessian")
MIN_POINTS, MAX_POINTS = 3, 101  # grid points per axis (101 x 101 = 10,201 forwards)
DEFAULT_EXAMPLES = 32  # the fixed batch: the first 32 examples of the run's feedback data
HVP_STEP = 1e-5  # norm of the parameter displacement of the finite-difference Hessian-vector product
INTERPOLATION_RANGE = (-0.5, 1.5)
SHIFT_RANGE_BETA = 3.0  # the shift c spans [-3/β, 3/β] nats: βc in [-3, 3], the sigmoid's width
VARIANT_TITLES = {"edifice": "edifice (seed)", "edifice_stop_z_grad": "edifice, stop_z_grad",
                  "kto": "kto (paper / TRL)", "apo_zero_unpaired": "apo_zero_unpaired", "dpo": "DPO",
                  "sft": "SFT (NLL)"}


class LandscapeError(ValueError):
    """A run folder, an option or data that cannot give the asked-for landscape (one line)."""


# ----------------------------------------------------------------------------------------------
# parameters as vectors


def _combine(base: dict, *terms) -> dict:
    """base + sum_k a_k d_k, key by key (float64): terms are (a_k, d_k) pairs."""
    out = {}
    for name, value in base.items():
        total = np.array(value, dtype=np.float64, copy=True)
        for scale, direction in terms:
            if scale != 0.0:
                total += scale * direction[name]
        out[name] = total
    return out


def _dot(a: dict, b: dict) -> float:
    return float(sum(np.vdot(a[k], b[k]) for k in a))


def _flatten(params: dict) -> np.ndarray:
    return np.concatenate([np.ravel(params[k]) for k in params])


def _unflatten(vector: np.ndarray, like: dict) -> dict:
    out, start = {}, 0
    for name, value in like.items():
        size = int(np.size(value))
        out[name] = vector[start:start + size].reshape(np.shape(value))
        start += size
    return out


def _to_float64(params: dict) -> dict:
    return {k: to_numpy(v).astype(np.float64) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# the loss of one fixed batch


class LossProblem(NamedTuple):
    """A loss on one fixed batch, everything but the policy parameters fixed (float64).

    The KTO variants are the library's: the value is config.loss_and_grad of the model's log-probs,
    the gradient step.kto_step's (for "kto" plus the path through z_ref, _z_ref_path_grads).
    """

    model: GPT  # float64, no dropout
    batch: Batch  # float64 masks; "sft": the desirable rows only
    variant: str  # one of LOSS_VARIANTS
    config: KTOConfig  # the library loss evaluated: β, λ_D, λ_U and its variant (edifice, kto, apo_zero_unpaired;
    #                    "edifice_stop_z_grad": apo_zero_unpaired against shifted ref_logps, see make_problem)
    ref_logps: np.ndarray  # [B] frozen reference, matched rows ("edifice_stop_z_grad": + z0 / β)
    kl_ref_logps: np.ndarray  # [B] frozen reference, KL rows
    offset: float  # added to the library loss: -mean_i w_i for "edifice_stop_z_grad", else 0
    pairs: tuple  # dpo: (chosen rows [P], rejected rows [P]); () otherwise


def _dpo_pairs(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Rows (chosen, rejected) of prompts that have a desirable and an undesirable completion."""
    labels = to_numpy(batch.labels)
    chosen, rejected, used = [], [], set()
    for i, prompt in enumerate(batch.prompts):
        if labels[i] != 1 or i in used:
            continue
        for j, other in enumerate(batch.prompts):
            if other == prompt and labels[j] == 0 and j not in used:
                chosen.append(i)
                rejected.append(j)
                used.update((i, j))
                break
    return np.array(chosen, dtype=np.int64), np.array(rejected, dtype=np.int64)


def _batch_rows(batch: Batch, rows) -> Batch:
    """The sub-batch of `rows` (matched rows, their KL rows and strings)."""
    def pick(strings):
        return tuple(strings[i] for i in rows) if strings else ()

    return Batch(tokens=batch.tokens[rows], completion_mask=batch.completion_mask[rows], labels=batch.labels[rows],
                 kl_tokens=batch.kl_tokens[rows], kl_completion_mask=batch.kl_completion_mask[rows],
                 prompts=pick(batch.prompts), completions=pick(batch.completions),
                 kl_completions=pick(batch.kl_completions))


def make_problem(model: GPT, ref_params: dict, batch: Batch, variant: str, *, config: KTOConfig | None = None,
                 center: dict | None = None) -> LossProblem:
    """The loss `variant` on `batch` against the frozen reference `ref_params` (all cast to float64).

    config: β and the weights λ_D, λ_U (a losses.KTOConfig, checked when it was made; default
    KTOConfig()); its variant and stop_z_grad are replaced by the ones `variant` names. "dpo" uses its β.
    center: the parameters at which "edifice_stop_z_grad" freezes z (required for that variant).

    "edifice_stop_z_grad" is edifice with z held at z0 = mean β r at the centre:
    loss_i = -w_i σ(s_i (β r_i - z0)). With r'_i = r_i - z0 / β (the reference shifted by z0 / β),
    -w_i σ(s_i β r'_i) = w_i σ(-s_i β r'_i) - w_i, the apo_zero_unpaired loss_i minus w_i; so the value is
    the library's apo_zero_unpaired against ref_logps + z0 / β, minus mean_i w_i, and its gradient
    (no z term) is step.kto_step's for that config, equal at the centre to edifice's with stop_z_grad.

    Raises LandscapeError when the data cannot serve the variant: "dpo" without a prompt that has both
    a desirable and an undesirable completion, "sft" without a desirable completion.
    """
    check_choice("variant", variant, LOSS_VARIANTS)
    config = KTOConfig() if config is None else config
    if not isinstance(config, KTOConfig):
        raise TypeError(f"config must be a losses.KTOConfig, got {type(config).__name__}")
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be a data.Batch, got {type(batch).__name__}")
    model = GPT(replace(model.config, dtype="float64", dropout=0.0))
    batch = batch._replace(completion_mask=to_numpy(batch.completion_mask).astype(np.float64),
                           kl_completion_mask=to_numpy(batch.kl_completion_mask).astype(np.float64),
                           tokens=to_numpy(batch.tokens), kl_tokens=to_numpy(batch.kl_tokens),
                           labels=to_numpy(batch.labels))
    ref_params = _to_float64(ref_params)
    labels = batch.labels
    pairs: tuple = ()
    if variant == "dpo":
        pairs = _dpo_pairs(batch)
        if pairs[0].size == 0:
            raise LandscapeError(
                f"variant 'dpo' needs pairs (a prompt with a desirable and an undesirable completion); "
                f"the {len(labels)} examples of the batch have none: use a KTO variant or paired data")
    if variant == "sft":
        if not labels.any():
            raise LandscapeError(f"variant 'sft' needs desirable completions; the {len(labels)} examples of the "
                                 "batch have none")
        batch = _batch_rows(batch, np.flatnonzero(labels == 1))
    if variant == "edifice_stop_z_grad" and center is None:
        raise ValueError("center must be given for variant 'edifice_stop_z_grad' (z is frozen there)")
    library_variant = {"edifice_stop_z_grad": "apo_zero_unpaired"}.get(variant, variant)
    if library_variant in KTO_VARIANTS:
        config = replace(config, variant=library_variant, stop_z_grad=False)
    ref_logps, kl_ref_logps = reference_logps(model, ref_params, batch)
    offset = 0.0
    if variant == "edifice_stop_z_grad":
        center_logps = forward_logps(model, _to_float64(center), batch.tokens, batch.completion_mask)
        frozen_z = float(np.mean(config.beta * (center_logps - ref_logps)))  # z0 = mean β r at the centre
        ref_logps = ref_logps + frozen_z / config.beta
        offset = -float(np.mean(np.where(labels == 1, config.desirable_weight, config.undesirable_weight)))
    return LossProblem(model, batch, variant, config, ref_logps, kl_ref_logps, offset, pairs)


def _loss_of_logps(problem: LossProblem, logps, kl_logps=None, shift: float = 0.0) -> float:
    """The loss from the policy's log-probs [B] (and its KL-row log-probs [B] for "kto"), with `shift`
    added to every one of them."""
    p = problem
    logps = np.asarray(logps, dtype=np.float64) + shift
    if p.variant == "dpo":
        chosen, rejected = p.pairs
        return dpo_loss(logps[chosen], logps[rejected], p.ref_logps[chosen], p.ref_logps[rejected], p.config.beta)
    if p.variant == "sft":  # step.sft_step's loss, forward only: -sum_b logp_b / N_tokens
        return -float(logps.sum()) / float(p.batch.completion_mask.sum())
    kl = (np.asarray(kl_logps) + shift, p.kl_ref_logps) if p.config.uses_kl_pairs else (None, None)
    return p.config.loss_and_grad(logps, p.ref_logps, p.batch.labels, *kl)[0] + p.offset


def _grads_through_logps(model: GPT, params: dict, tokens, completion_mask, loss_of_logps):
    """(value, dvalue/dparams) of a function of completion log-probs: step.completion_logps [B] ->
    loss_of_logps(logps) -> (value, dvalue/dlogps [B]) -> log-prob backward -> model backward."""
    logps, (model_cache, logp_cache) = completion_logps(model, params, tokens, completion_mask)
    value, dlogps = loss_of_logps(logps)
    return value, model.backward(sequence_logprobs_backward(dlogps, logp_cache), model_cache)


def _z_ref_path_grads(problem: LossProblem, params: dict) -> dict:
    """"kto", while z_ref > 0 (the caller checks): the gradient that reaches the parameters through
    z_ref = max(0, mean_j(kl_logps_j - kl_ref_j)). Training detaches it (step.kto_step); the landscape
    keeps it, so that its slopes and curvature are those of the loss value it draws. The loss depends on
    r_i - z_ref only, so dL/dz_ref = -sum_i dL/dlogps_i (z_ref held fixed), and dz_ref/dkl_logps_j = 1/B."""
    p, b = problem, problem.batch
    logps = forward_logps(p.model, params, b.tokens, b.completion_mask)

    def through_z_ref(kl_logps):
        loss, dlogps, _ = p.config.loss_and_grad(logps, p.ref_logps, b.labels, kl_logps, p.kl_ref_logps)
        return loss, np.full_like(kl_logps, -float(dlogps.sum()) / kl_logps.shape[0])

    return _grads_through_logps(p.model, params, b.kl_tokens, b.kl_completion_mask, through_z_ref)[1]


def _policy_logps(problem: LossProblem, params: dict):
    """Forward only: (matched-row log-probs [B], KL-row log-probs [B] or None when the loss ignores them)."""
    b = problem.batch
    logps = forward_logps(problem.model, params, b.tokens, b.completion_mask)
    kl_logps = None
    if problem.variant == "kto":
        kl_logps = forward_logps(problem.model, params, b.kl_tokens, b.kl_completion_mask)
    return to_numpy(logps), None if kl_logps is None else to_numpy(kl_logps)


def loss_value(problem: LossProblem, params: dict, shift: float = 0.0) -> float:
    """The loss at params (forward only), with `shift` added to every policy log-probability."""
    logps, kl_logps = _policy_logps(problem, _to_float64(params))
    return _loss_of_logps(problem, logps, kl_logps, shift)


def loss_and_grad(problem: LossProblem, params: dict) -> tuple[float, dict]:
    """(loss, dL/dparams): the gradient of the function the landscape draws.

    KTO variants: step.kto_step with the problem's config ("edifice_stop_z_grad": of the surrogate with
    z frozen at the centre), and for "kto" plus the path through z_ref, which the training step
    detaches (_z_ref_path_grads). "sft": step.sft_step. "dpo": dpo.dpo_loss_and_grad, backward
    through the log-probs.
    """
    params = _to_float64(params)
    p, b = problem, problem.batch
    if p.variant == "sft":
        loss, _, grads = sft_step(p.model, params, b)
        return loss, grads
    if p.variant == "dpo":
        chosen, rejected = p.pairs

        def dpo(logps):
            loss, (dchosen, drejected), _ = dpo_loss_and_grad(logps[chosen], logps[rejected], p.ref_logps[chosen],
                                                              p.ref_logps[rejected], p.config.beta)
            dlogps = np.zeros_like(logps)
            dlogps[chosen] += dchosen
            dlogps[rejected] += drejected
            return loss, dlogps

        return _grads_through_logps(p.model, params, b.tokens, b.completion_mask, dpo)
    kl_ref_logps = p.kl_ref_logps if p.config.uses_kl_pairs else None
    loss, metrics, grads = kto_step(p.model, params, b, p.ref_logps, kl_ref_logps, p.config)
    if p.config.uses_kl_pairs and metrics["kl"] > 0.0:  # metrics["kl"] is z_ref
        z_ref_grads = _z_ref_path_grads(p, params)
        grads = {k: grads[k] + z_ref_grads[k] for k in grads}
    return loss + p.offset, grads


# ----------------------------------------------------------------------------------------------
# directions


def _filter_axis(name: str) -> int:
    """The axis a filter's entries run along: 1 for tables whose rows are output units (embeddings,
    lm_head), 0 for [in, out] weights (a column per output unit)."""
    return 1 if name.split(".")[0] in ("wte", "wpe", "lm_head") else 0


def filter_normalize(direction: dict, params: dict) -> dict:
    """Li et al. 2018: d_f <- d_f |θ_f| / |d_f| for every filter f of every weight matrix (float64);
    1-D tensors (biases, LayerNorm weights and biases) become 0."""
    out = {}
    for name, value in params.items():
        theta = np.asarray(value, dtype=np.float64)
        d = np.asarray(direction[name], dtype=np.float64)
        if theta.ndim < 2:
            out[name] = np.zeros_like(theta)
            continue
        axis = _filter_axis(name)
        theta_norms = np.linalg.norm(theta, axis=axis, keepdims=True)
        d_norms = np.linalg.norm(d, axis=axis, keepdims=True)
        scale = np.divide(theta_norms, d_norms, out=np.zeros_like(d_norms), where=d_norms > 0)
        out[name] = d * scale
    return out


def random_direction(params: dict, rng: np.random.Generator) -> dict:
    """A Gaussian direction (drawn in the params' key order from rng), filter-normalised to params."""
    return filter_normalize({k: rng.standard_normal(np.shape(v)) for k, v in params.items()}, params)


def pca_directions(points: list[dict]):
    """The first two principal directions of a trajectory whose LAST point is the centre.

    Rows θ_i - θ_n (i < n) -> SVD -> unit directions d1, d2; returns (d1, d2, coords [n + 1, 2] of every
    point, explained variance ratio [2]). Needs at least 3 points.
    """
    if len(points) < 3:
        raise LandscapeError(f"the trajectory needs at least 3 points for two principal directions, got "
                             f"{len(points)}")
    center = _flatten(_to_float64(points[-1]))
    rows = np.stack([_flatten(_to_float64(p)) - center for p in points[:-1]])  # [n, P]
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    directions = vt[:2]  # [2, P]
    for k in range(2):  # a fixed sign: the reference (first point) at a negative coordinate
        if rows[0] @ directions[k] > 0:
            directions[k] = -directions[k]
    coords = np.vstack([rows @ directions.T, np.zeros((1, 2))])  # [n + 1, 2], the centre at 0
    explained = singular[:2] ** 2 / float(np.sum(singular ** 2))
    like = points[-1]
    return _unflatten(directions[0], like), _unflatten(directions[1], like), coords, explained


def hessian_vector_product(problem: LossProblem, params: dict, vector: dict, *, step: float = HVP_STEP) -> dict:
    """H v ≈ (g(θ + h v̂) - g(θ - h v̂)) / (2h) · |v|, v̂ = v / |v|, h = step (float64, exact gradients)."""
    norm = math.sqrt(_dot(vector, vector))
    if norm == 0.0:
        return {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in vector.items()}
    scale = step / norm  # θ ± scale v moves θ by `step`
    _, plus = loss_and_grad(problem, _combine(params, (scale, vector)))
    _, minus = loss_and_grad(problem, _combine(params, (-scale, vector)))
    return {k: (plus[k] - minus[k]) / (2.0 * scale) for k in plus}


def power_iteration(matvec, dim: int, *, num_vectors: int = 2, iterations: int = 100, tol: float = 1e-6,
                    seed: int = 0):
    """The num_vectors eigenpairs of largest |eigenvalue| of a symmetric operator, by power iteration;
    each later one on the operator deflated by the earlier ones, A v - sum_k λ_k (v_k·v) v_k.

    matvec: [dim] -> [dim]. Stops when the Rayleigh quotient changes by <= tol |λ|, or after
    `iterations`. Returns (eigenvalues [k], eigenvectors [k, dim], unit norm).
    """
    dim = check_positive_int("dim", dim)
    num_vectors = check_positive_int("num_vectors", num_vectors)
    if num_vectors > dim:
        raise ValueError(f"num_vectors must be <= dim={dim}, got {num_vectors}")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    vectors: list[np.ndarray] = []

    def deflated(v):
        out = np.asarray(matvec(v), dtype=np.float64)
        for lam, u in zip(values, vectors):
            out = out - lam * (u @ v) * u
        return out

    for _ in range(num_vectors):
        v = rng.standard_normal(dim)
        for u in vectors:
            v -= (u @ v) * u
        v /= np.linalg.norm(v)
        lam = None
        for _ in range(iterations):
            w = deflated(v)
            new_lam = float(v @ w)
            norm = np.linalg.norm(w)
            if norm == 0.0:
                lam = 0.0
                break
            v = w / norm
            if lam is not None and abs(new_lam - lam) <= tol * max(abs(new_lam), 1e-300):
                lam = new_lam
                break
            lam = new_lam
        values.append(float(v @ deflated(v)) if lam != 0.0 else 0.0)
        vectors.append(v)
    return np.array(values), np.stack(vectors)


def hessian_directions(problem: LossProblem, params: dict, *, scale: float = 1.0, seed: int = 0,
                       iterations: int = 50, tol: float = 1e-4, progress: bool = False):
    """The top two Hessian eigen-directions at params: (d1, d2, eigenvalues [2]), the unit
    eigenvectors times `scale`."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    params = _to_float64(params)
    bar = tqdm(desc="Hessian-vector products", disable=None if progress else True, leave=False)

    def matvec(v):
        bar.update(1)
        return _flatten(hessian_vector_product(problem, params, _unflatten(v, params)))

    values, vectors = power_iteration(matvec, sum(int(np.size(v)) for v in params.values()), num_vectors=2,
                                      iterations=iterations, tol=tol, seed=seed)
    bar.close()
    return _unflatten(vectors[0] * scale, params), _unflatten(vectors[1] * scale, params), values


def logprob_shift_direction(problem: LossProblem, params: dict) -> dict:
    """The minimum-norm parameter direction d with J d = 1: to first order it adds the same amount to
    every policy log-probability the loss sees (matched rows, and KL rows for "kto"). J [R, P] is
    the Jacobian of those log-probs, one model backward per row; d = J⁺ 1 (pseudo-inverse)."""
    params = _to_float64(params)
    b = problem.batch
    row_sets = [(b.tokens, b.completion_mask)]
    if problem.variant == "kto":
        row_sets.append((b.kl_tokens, b.kl_completion_mask))
    rows = []
    for tokens, mask in row_sets:
        for i in range(tokens.shape[0]):
            onehot = np.zeros(tokens.shape[0])
            onehot[i] = 1.0
            _, row = _grads_through_logps(problem.model, params, tokens, mask,
                                          lambda logps, d=onehot: (0.0, d))  # d logp_i / d params
            rows.append(_flatten(row))
    jacobian = np.stack(rows)  # [R, P]
    # minimum-norm least squares: rows that are the same sequence twice (a KL row equal to a matched
    # row) make J J^T singular but the equations consistent
    direction = np.linalg.lstsq(jacobian, np.ones(len(rows)), rcond=None)[0]
    return _unflatten(direction, params)


# ----------------------------------------------------------------------------------------------
# evaluation on grids


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)


def landscape_grid(problem: LossProblem, center: dict, d1: dict, d2: dict, alphas, betas, *,
                   progress: bool = False) -> np.ndarray:
    """loss[i, j] = L(center + alphas[i] d1 + betas[j] d2): [N_alpha, N_beta], float64."""
    alphas, betas = np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64)
    center = _to_float64(center)
    loss = np.empty((alphas.size, betas.size))
    bar = _bar(loss.size, f"landscape ({problem.variant})", progress)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            loss[i, j] = loss_value(problem, _combine(center, (a, d1), (b, d2)))
            bar.update(1)
    bar.close()
    return loss


def interpolation_losses(problem: LossProblem, start: dict, end: dict, ts, *, progress: bool = False):
    """L(start + t (end - start)) for every t: [M]. t = 0 is start, t = 1 is end."""
    start, end = _to_float64(start), _to_float64(end)
    delta = {k: end[k] - start[k] for k in start}
    ts = np.asarray(ts, dtype=np.float64)
    out = np.empty(ts.size)
    bar = _bar(ts.size, f"interpolation ({problem.variant})", progress)
    for m, t in enumerate(ts):
        out[m] = loss_value(problem, _combine(start, (t, delta)))
        bar.update(1)
    bar.close()
    return out


def shift_losses(problems: dict, start: dict, end: dict, ts, shifts, *, progress: bool = False) -> dict:
    """{variant: loss [M, K]}: the loss at θ(t) = start + t (end - start) with c = shifts[k] added to
    every policy log-prob. The log-probs come from one model forward per t (matched and KL rows),
    shared by the problems (which must share the model and the batch)."""
    start, end = _to_float64(start), _to_float64(end)
    delta = {k: end[k] - start[k] for k in start}
    ts, shifts = np.asarray(ts, dtype=np.float64), np.asarray(shifts, dtype=np.float64)
    out = {name: np.empty((ts.size, shifts.size)) for name in problems}
    any_problem = next(iter(problems.values()))
    b = any_problem.batch
    bar = _bar(ts.size, "shift comparison", progress)
    for m, t in enumerate(ts):
        params = _combine(start, (t, delta))
        logps = to_numpy(forward_logps(any_problem.model, params, b.tokens, b.completion_mask))
        kl_logps = to_numpy(forward_logps(any_problem.model, params, b.kl_tokens, b.kl_completion_mask))
        for name, problem in problems.items():
            for k, c in enumerate(shifts):
                out[name][m, k] = _loss_of_logps(problem, logps, kl_logps, c)
        bar.update(1)
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------
# a run folder


class RunStates(NamedTuple):
    """What a landscape needs from a run folder (parameters as float64 NumPy arrays)."""

    config: TrainConfig
    model: GPT  # float64, no dropout
    reference: dict
    policy: dict
    policy_step: int
    trajectory: list  # [(step, params)] from the reference (step 0) to the policy


def _relative(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, name)


def load_run(run_dir, *, need_trajectory: bool = False) -> RunStates:
    """Read config.json, checkpoints/reference.npz, checkpoints/kto.npz (and the trajectory snapshots
    when need_trajectory). LandscapeError names the first missing or unreadable file."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise LandscapeError(f"--run {run_dir!r} is not a folder (make one with kto-np demo)")
    config_path = _relative(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise LandscapeError(f"run folder {run_dir!r} has no config.json (missing: {config_path})")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = TrainConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise LandscapeError(f"{config_path!r} is not a valid run config ({exc})") from exc
    states = {}
    for role, name in (("reference", "checkpoints/reference.npz"), ("policy", "checkpoints/kto.npz")):
        path = _relative(run_dir, name)
        if not os.path.isfile(path):
            what = "the reference" if role == "reference" else "the trained policy"
            raise LandscapeError(f"run folder {run_dir!r} has no {name} ({what}; missing: {path})")
        try:
            states[role] = load(path)
        except CheckpointError as exc:
            raise LandscapeError(str(exc)) from exc
    model = GPT(replace(states["reference"].config, dtype="float64", dropout=0.0))
    reference = _to_float64(states["reference"].params)
    policy = _to_float64(states["policy"].params)
    policy_step = int(states["policy"].extra.get("step", config.steps))
    trajectory = [(0, reference)]
    folder = _relative(run_dir, TRAJECTORY_DIR)
    names = sorted(n for n in os.listdir(folder) if n.startswith("kto_step_") and n.endswith(".npz")) \
        if os.path.isdir(folder) else []
    if need_trajectory:
        for name in names:
            try:
                saved = load(os.path.join(folder, name))
            except CheckpointError as exc:
                raise LandscapeError(str(exc)) from exc
            step = int(saved.extra.get("step", int(name[len("kto_step_"):-len(".npz")])))
            if 0 < step < policy_step:
                trajectory.append((step, _to_float64(saved.params)))
        trajectory.append((policy_step, policy))
        if len(trajectory) < 3:
            raise LandscapeError(
                f"--directions pca needs the run's trajectory: {folder!r} has no kto_step_*.npz snapshots "
                f"before step {policy_step} (runs made by this version of kto-np keep them; rerun kto-np demo)")
    return RunStates(config, model, reference, policy, policy_step, trajectory)


def run_batch(config: TrainConfig, num_examples: int) -> Batch:
    """The first num_examples of the run's own KTO feedback data (the examples it trained on), float64."""
    num_examples = check_positive_int("num_examples", num_examples)
    if num_examples > config.num_examples:
        raise LandscapeError(f"--examples must be <= the run's num_examples ({config.num_examples}), "
                             f"got {num_examples}")
    return collate(kto_examples(config)[:num_examples], Tokenizer(), dtype="float64")


def run_variant(config: TrainConfig) -> str:
    """The loss variant the run trained with, in LOSS_VARIANTS' names."""
    return "edifice_stop_z_grad" if config.variant == "edifice" and config.stop_z_grad else config.variant


class Landscape(NamedTuple):
    """A 2-D landscape: loss[i, j] at alpha[i], beta[j]; the centre (the policy) at (0, 0)."""

    loss: np.ndarray  # [N, N]
    alpha: np.ndarray  # [N]
    beta: np.ndarray  # [N]
    directions: str
    variant: str
    center_loss: float
    trajectory: np.ndarray  # [K, 2] (pca), else [0, 2]
    trajectory_steps: np.ndarray  # [K]
    eigenvalues: np.ndarray  # [2] (hessian), else [0]
    explained_variance: np.ndarray  # [2] (pca), else [0]


def check_grid_options(points, span) -> tuple[int, float]:
    """points in [MIN_POINTS, MAX_POINTS], span > 0 and finite; LandscapeError otherwise."""
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or not \
            MIN_POINTS <= points <= MAX_POINTS:
        raise LandscapeError(f"--points must be an integer in [{MIN_POINTS}, {MAX_POINTS}] (a {MAX_POINTS} x "
                             f"{MAX_POINTS} grid is {MAX_POINTS ** 2:,} forwards), got {points!r}")
    try:
        span = float(span)
    except (TypeError, ValueError):
        raise LandscapeError(f"--span must be a positive number, got {span!r}") from None
    if not math.isfinite(span) or span <= 0:
        raise LandscapeError(f"--span must be a positive finite number, got {span}")
    return int(points), span


def compute_landscape(states: RunStates, problem: LossProblem, directions: str, *, points: int = 21,
                      span: float = 1.0, seed: int = 0, progress: bool = False) -> Landscape:
    """The 2-D landscape of `problem` around the run's policy along `directions` (random | pca | hessian).

    random: alpha, beta in [-span, span] (filter-normalised units: 1 is a step as large as each filter).
    hessian: [-span, span] in curvature units (module docstring). pca: [-r, r] with r = span × 1.2 × the
    trajectory's largest |coordinate|.
    """
    check_choice("directions", directions, DIRECTIONS)
    points, span = check_grid_options(points, span)
    empty = np.zeros((0,))
    trajectory, steps, eigenvalues, explained = np.zeros((0, 2)), np.zeros((0,), dtype=np.int64), empty, empty
    if directions == "random":
        rng = np.random.default_rng(seed)
        d1, d2 = random_direction(states.policy, rng), random_direction(states.policy, rng)
        radius = span
    elif directions == "pca":
        d1, d2, trajectory, explained = pca_directions([p for _, p in states.trajectory])
        steps = np.array([s for s, _ in states.trajectory], dtype=np.int64)
        radius = span * 1.2 * float(np.abs(trajectory).max())
    else:
        d1, d2, eigenvalues = hessian_directions(problem, states.policy, seed=seed, progress=progress)
        rise = max(abs(loss_value(problem, states.policy)), 0.1)
        for d, eigenvalue in ((d1, eigenvalues[0]), (d2, eigenvalues[1])):
            length = math.sqrt(2.0 * rise / abs(eigenvalue)) if eigenvalue != 0 else 1.0
            for k in d:
                d[k] *= length
        radius = span
    axis = (np.arange(points) - points // 2) * (radius / (points // 2))  # [-r, r], 0 on the grid (even N: to r - step)
    loss = landscape_grid(problem, states.policy, d1, d2, axis, axis, progress=progress)
    return Landscape(loss, axis, axis.copy(), directions, problem.variant, loss_value(problem, states.policy),
                     trajectory, steps, eigenvalues, explained)


def desirable_rates(states: RunStates, ts, *, num_prompts: int = 128, progress: bool = False) -> np.ndarray:
    """The desirable rate of completions sampled (the run's evaluation seed and temperature) from the
    model θ_ref + t (θ* - θ_ref) on num_prompts held-out prompts: [M]."""
    config = states.config
    task = make_task(config.task, config.num_digits)
    prompts = heldout_prompts(config, num_prompts)
    delta = {k: states.policy[k] - states.reference[k] for k in states.policy}
    bar = _bar(len(ts), "desirable rate", progress)
    rates = []
    for t in ts:
        params = _combine(states.reference, (float(t), delta))
        rates.append(evaluate(states.model, params, task, prompts, temperature=config.eval_temperature)
                     ["desirable_rate"])
        bar.update(1)
    bar.close()
    return np.array(rates)


def interpolation_ts(points: int) -> np.ndarray:
    """[-0.5, 1.5] in steps of 1/(4m), m = ceil((points - 1) / 8) >= 1: 0 and 1 are on the grid."""
    m = max(1, math.ceil((points - 1) / 8))
    return np.linspace(INTERPOLATION_RANGE[0], INTERPOLATION_RANGE[1], 8 * m + 1)


def run_landscape(run_dir, out_dir=None, *, variant: str | None = None, directions=("random",),
                  points: int = 21, span: float = 1.0, seed: int = 0, num_examples: int | None = None,
                  eval_prompts: int = 128, write_data: bool = True, progress: bool = False, log=print) -> dict:
    """Everything `kto-np landscape` writes, into out_dir (default <run>/landscape):
    landscape_<directions>.png for each directions kind, landscape_interpolation.png,
    landscape_variants.png and (write_data) landscape.npz of the first directions kind.
    Returns {"paths": [...], "seconds": {name: wall-clock s}, "cpu_seconds": {name: CPU s}}."""
    directions = (directions,) if isinstance(directions, str) else tuple(directions)
    for d in directions:
        check_choice("directions", d, DIRECTIONS)
    points, span = check_grid_options(points, span)
    seed = check_positive_int("seed", seed, minimum=0)
    eval_prompts = check_positive_int("eval_prompts", eval_prompts)
    run_dir = os.fspath(run_dir)
    out_dir = os.path.join(run_dir, "landscape") if out_dir is None else os.fspath(out_dir)
    states = load_run(run_dir, need_trajectory="pca" in directions)
    config = states.config
    variant = run_variant(config) if variant is None else check_choice("variant", variant, LOSS_VARIANTS)
    batch = run_batch(config, min(DEFAULT_EXAMPLES, config.num_examples) if num_examples is None else num_examples)
    hyper = config.kto_config()  # β and the weights of the run; make_problem sets the variant
    problem = make_problem(states.model, states.reference, batch, variant, config=hyper, center=states.policy)
    paths, seconds, cpu_seconds = [], {}, {}
    os.makedirs(out_dir, exist_ok=True)

    landscapes = []
    for kind in directions:
        started, cpu = time.perf_counter(), time.process_time()
        result = compute_landscape(states, problem, kind, points=points, span=span, seed=seed, progress=progress)
        path = os.path.join(out_dir, f"landscape_{kind}.png")
        _save(plot_landscape(result), path)
        seconds[f"landscape_{kind}"] = time.perf_counter() - started
        cpu_seconds[f"landscape_{kind}"] = time.process_time() - cpu
        landscapes.append(result)
        paths.append(path)
        log(f"{path}: {variant} over {kind} directions, {points} x {points}, {seconds[f'landscape_{kind}']:.1f} s "
            f"({cpu_seconds[f'landscape_{kind}']:.1f} s CPU)")

    started, cpu = time.perf_counter(), time.process_time()
    ts = interpolation_ts(points)
    interpolation = interpolation_losses(problem, states.reference, states.policy, ts, progress=progress)
    rates = desirable_rates(states, ts, num_prompts=eval_prompts, progress=progress)
    path = os.path.join(out_dir, "landscape_interpolation.png")
    _save(plot_interpolation(ts, interpolation, rates, variant=variant), path)
    seconds["interpolation"] = time.perf_counter() - started
    cpu_seconds["interpolation"] = time.process_time() - cpu
    paths.append(path)
    log(f"{path}: reference -> policy, {ts.size} points, {seconds['interpolation']:.1f} s "
        f"({cpu_seconds['interpolation']:.1f} s CPU)")

    started, cpu = time.perf_counter(), time.process_time()
    problems = {v: make_problem(states.model, states.reference, batch, v, config=hyper, center=states.policy)
                for v in COMPARISON_VARIANTS}
    shifts = np.linspace(-SHIFT_RANGE_BETA / config.beta, SHIFT_RANGE_BETA / config.beta, points)
    comparison = shift_losses(problems, states.reference, states.policy, ts, shifts, progress=progress)
    path = os.path.join(out_dir, "landscape_variants.png")
    _save(plot_variant_comparison(ts, shifts, comparison, beta=config.beta), path)
    seconds["variants"] = time.perf_counter() - started
    cpu_seconds["variants"] = time.process_time() - cpu
    paths.append(path)
    log(f"{path}: {', '.join(COMPARISON_VARIANTS)} over (t, shift c), {seconds['variants']:.1f} s "
        f"({cpu_seconds['variants']:.1f} s CPU)")

    if write_data:
        first = landscapes[0]
        path = os.path.join(out_dir, "landscape.npz")
        write_npz(path, {
            "loss": first.loss, "alpha": first.alpha, "beta": first.beta,
            "directions": np.array(first.directions), "variant": np.array(variant),
            "center_loss": np.array(first.center_loss), "kto_beta": np.array(config.beta),
            "seed": np.array(seed, dtype=np.int64),
            "trajectory": first.trajectory, "trajectory_steps": first.trajectory_steps,
            "eigenvalues": first.eigenvalues, "explained_variance": first.explained_variance,
            "interpolation_t": ts, "interpolation_loss": interpolation, "interpolation_desirable_rate": rates,
            "shift": shifts, "comparison_variants": np.array(COMPARISON_VARIANTS),
            "comparison_loss": np.stack([comparison[v] for v in COMPARISON_VARIANTS]),
        })
        paths.append(path)
        log(f"{path}: loss [{points}, {points}], alpha [{points}], beta [{points}] (the policy at 0, 0)")
    return {"paths": paths, "seconds": seconds, "cpu_seconds": cpu_seconds}


# ----------------------------------------------------------------------------------------------
# figures (matplotlib is imported only here)


def _save(fig, path) -> None:
    from .plots import save_figure  # noqa: PLC0415

    save_figure(fig, path)


def _figure(nrows: int, ncols: int, size):
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_landscape(result: Landscape):
    """Filled contours of result.loss over (alpha, beta), the policy at the centre; the trajectory
    (pca) with its steps; the eigenvalues (hessian) in the title."""
    fig, axes = _figure(1, 1, (6.0, 5.0))
    ax = axes[0, 0]
    filled = ax.contourf(result.alpha, result.beta, result.loss.T, levels=30, cmap="viridis")
    ax.contour(result.alpha, result.beta, result.loss.T, levels=15, colors="white", linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, label=f"{VARIANT_TITLES[result.variant]} loss")
    if result.trajectory.shape[0]:
        ax.plot(result.trajectory[:, 0], result.trajectory[:, 1], "-o", color="#E69F00", markersize=3,
                linewidth=1.2, label="training trajectory")
        ax.annotate("reference", result.trajectory[0], textcoords="offset points", xytext=(4, 4), color="white")
    ax.plot([0], [0], marker="*", color="#D55E00", markersize=14, linestyle="none",
            label=f"policy (loss {result.center_loss:.4f})")
    names = {"random": ("filter-normalised direction 1", "filter-normalised direction 2"),
             "pca": ("PC 1", "PC 2"), "hessian": ("Hessian eigen-direction 1", "eigen-direction 2")}[result.directions]
    xlabel, ylabel = names
    if result.directions == "pca":
        xlabel += f" ({result.explained_variance[0]:.0%} of the variance)"
        ylabel += f" ({result.explained_variance[1]:.0%})"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    title = f"{VARIANT_TITLES[result.variant]} loss around the policy ({result.directions})"
    if result.eigenvalues.size:
        title += f"\nλ1 = {result.eigenvalues[0]:.3g}, λ2 = {result.eigenvalues[1]:.3g}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_interpolation(ts, losses, rates, *, variant: str):
    """Loss and desirable rate along θ_ref + t (θ* - θ_ref): the reference at t = 0, the policy at 1."""
    fig, axes = _figure(1, 2, (10.0, 3.8))
    ax_loss, ax_rate = axes[0]
    ax_loss.plot(ts, losses, "-o", markersize=3, color="#0072B2")
    ax_loss.set_ylabel(f"{VARIANT_TITLES[variant]} loss on the batch")
    ax_rate.plot(ts, np.asarray(rates) * 100, "-o", markersize=3, color="#009E73")
    ax_rate.set_ylabel("desirable rate of samples (%)")
    ax_rate.set_ylim(0, 100)
    for ax in (ax_loss, ax_rate):
        for t, name in ((0.0, "reference"), (1.0, "policy")):
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
            ax.annotate(name, (t, 1.0), xycoords=("data", "axes fraction"), textcoords="offset points",
                        xytext=(3, -12), fontsize=8, color="grey")
        ax.set_xlabel("t: θ_ref + t (θ_policy − θ_ref)")
    ax_loss.set_title("loss along the way from the reference to the policy", fontsize=10)
    ax_rate.set_title("what the interpolated model samples", fontsize=10)
    return fig


def plot_variant_comparison(ts, shifts, losses: dict, *, beta: float):
    """One policy, four losses over (t, c): t along reference -> policy, c added to every policy
    log-prob. Top: filled contours; bottom: L(t, c) - L(t, 0) along c at the reference and the policy."""
    names = list(losses)
    fig, axes = _figure(2, len(names), (4.0 * len(names), 6.6))
    t_index = int(np.argmin(np.abs(np.asarray(ts) - 1.0)))
    r_index = int(np.argmin(np.abs(np.asarray(ts))))
    zero = int(np.argmin(np.abs(np.asarray(shifts))))
    deviation = max(float(np.abs(losses[n][[t_index, r_index]] - losses[n][[t_index, r_index], zero:zero + 1]).max())
                    for n in names)
    limit = 1.1 * deviation if deviation > 0 else 1.0  # one scale for every panel: flat reads as flat
    for k, name in enumerate(names):
        loss = losses[name]
        ax = axes[0, k]
        filled = ax.contourf(ts, shifts, loss.T, levels=30, cmap="viridis")
        fig.colorbar(filled, ax=ax)
        ax.axvline(0.0, color="white", linestyle=":", linewidth=1)
        ax.axvline(1.0, color="white", linestyle=":", linewidth=1)
        ax.plot([1.0], [0.0], marker="*", color="#D55E00", markersize=12)
        ax.annotate("", xy=(-0.4, shifts[-1] * 0.8), xytext=(-0.4, shifts[0] * 0.8),
                    arrowprops=dict(arrowstyle="<->", color="black"))
        ax.annotate("every log-prob\n+ c", (-0.37, shifts[-1] * 0.55), color="black", fontsize=7, va="center")
        ax.set_title(VARIANT_TITLES[name], fontsize=10)
        ax.set_xlabel("t (0 reference, 1 policy)")
        if k == 0:
            ax.set_ylabel("shift c of every log-prob (nats)")
        ax2 = axes[1, k]
        ax2.plot(shifts, loss[t_index] - loss[t_index, zero], color="#D55E00", label="at the policy")
        ax2.plot(shifts, loss[r_index] - loss[r_index, zero], color="#0072B2",
                 linestyle="--", label="at the reference")
        ax2.axhline(0.0, color="grey", linewidth=0.6)
        ax2.set_ylim(-limit, limit)
        spread = float(np.ptp(loss[t_index]))
        ax2.set_title(f"max - min along c at the policy: {spread:.2g}", fontsize=9)
        ax2.set_xlabel(f"c (nats; βc in [{-SHIFT_RANGE_BETA:g}, {SHIFT_RANGE_BETA:g}], β = {beta:g})")
        if k == 0:
            ax2.set_ylabel("L(t, c) − L(t, 0)")
            ax2.legend(fontsize=8)
    fig.suptitle("The same policy under four losses: the seed formula is flat along the shift of all "
                 "log-probabilities; the anchored variants are not", fontsize=11)
    return fig
