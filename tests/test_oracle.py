"""The gradient oracle: our functions and independent re-implementations pass every case, each known
mistake (written here as a plain NumPy or torch candidate) fails with its own diagnosis, and exported
cases round-trip exactly and refuse to load when damaged."""

import hashlib
import json
import zipfile

import numpy as np
import pytest

from kto_np import files, oracle, torch_reference
from kto_np.oracle.cases import mistakes
from kto_np.oracle.cases.reference import kto_pair_candidate
from kto_np.oracle.compare.report import MAX_FAILING_ROWS

# the formula kinds; the pipeline kinds (kl_pairs, data_parallel, accumulation) and the mistakes found in real
# code are tested in test_oracle_mistakes.py and test_oracle_distributed.py
KIND_VARIANTS = [(kind, variant) for kind in oracle.KINDS if kind not in oracle.PIPELINE_KINDS
                 and kind != "model_edifice"  # its candidates and mutants: tests/test_oracle_edifice.py
                 for variant in oracle.VARIANTS[kind]]
REAL_CODE_MISTAKES = mistakes.REAL_CODE_MISTAKE_IDS


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")


def builtin(kind, variant=None):
    """kto_np's own candidate (the kto_pair variant's is cases.kto_pair_candidate)."""
    candidate = oracle.builtin_candidate(kind, variant)
    if kind == "kto_loss" and variant == "kto_pair":
        assert candidate is kto_pair_candidate
    return candidate


def assert_passed(report):
    assert report.passed, f"expected every check to pass:\n{report}"


def assert_diagnosed(report, mistake):
    assert not report.passed, f"mutant {mistake!r} passed the oracle:\n{report}"
    assert report.diagnosis.mistakes == (mistake,), (
        f"mutant {mistake!r} diagnosed as {report.diagnosis.mistakes}:\n{report}")


# ---------------------------------------------------------------------------------------------------
# independent NumPy candidates (loss only: the oracle takes their gradient by finite differences)


def np_sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def np_log_softmax(x):
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def numpy_kto_loss(variant, mistake=None):
    def candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                  kl_policy_logps=None, kl_ref_logps=None):
        if mistake == "weights_ignored":
            desirable_weight = undesirable_weight = 1.0
        b = {"beta_twice": beta * beta, "beta_missing": 1.0}.get(mistake, beta)
        r = policy_logps - ref_logps
        w = np.where(labels, desirable_weight, undesirable_weight)
        if variant.startswith("edifice"):
            kl = b * r
            z = kl.mean()
            if mistake == "z_clamped":
                z = max(0.0, z)
            undesirable_arg = -kl - z if mistake == "undesirable_sign" else -(kl - z)
            losses = np.where(labels, -desirable_weight * np_sigmoid(kl - z), -undesirable_weight
                              * np_sigmoid(undesirable_arg))
        elif variant == "kto_pair":  # the other class's clamped mean log-ratio (finite differences see through it)
            z_chosen, z_rejected = max(0.0, r[labels].mean()), max(0.0, r[~labels].mean())
            losses = w * np.where(labels, 1 - np_sigmoid(b * (r - z_rejected)), 1 - np_sigmoid(b * (z_chosen - r)))
        elif variant == "kto":
            z = 0.0 if kl_policy_logps is None else np.mean(kl_policy_logps - kl_ref_logps)
            if mistake != "z_not_clamped":
                z = max(0.0, z)
            undesirable = 1 - np_sigmoid(-b * r - b * z if mistake == "undesirable_sign" else b * (z - r))
            losses = w * np.where(labels, 1 - np_sigmoid(b * (r - z)), undesirable)
        else:
            losses = w * np.where(labels, 1 - np_sigmoid(b * r), np_sigmoid(b * r))
        if mistake == "weights_normalise_mean":
            return losses.sum() / w.sum()
        return losses.mean()

    return candidate


def numpy_dpo_loss(mistake=None):
    def candidate(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
        b = {"beta_twice": beta * beta, "beta_missing": 1.0}.get(mistake, beta)
        h = b * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
        return np.mean(np.logaddexp(0.0, -h))

    return candidate


def numpy_logprobs(shift, mistake=None):
    """Log-probs where logits at t score token t + shift; the mistakes change the shift, mask or sum."""
    def candidate(logits, tokens, mask):
        s = shift + {"logits_not_shifted": -1, "logits_shifted_twice": 1, "logits_shifted": 1}.get(mistake, 0)
        T = logits.shape[1]
        token_logps = np.take_along_axis(np_log_softmax(logits[:, :T - s]), tokens[:, s:, None], axis=-1)[..., 0]
        weights = np.ones_like(token_logps) if mistake == "mask_ignored" else mask[:, s:]
        total = (token_logps * weights).sum(axis=1)
        if mistake == "masked_mean":
            return total / weights.sum(axis=1)
        if mistake == "mean_over_time":
            return total / (T - s)
        return total

    return candidate


# ---------------------------------------------------------------------------------------------------
# PyTorch candidates: the shared independent twin (kto_np.torch_reference; autograd gives the gradients)
# passes; each known mistake is a wrapper around it, or for the loss's inner formula a deliberate
# second formula with the mistake switched in (the only other KTO formulas: the mutants)

BETA_MISTAKES = {"beta_twice": lambda beta: beta * beta, "beta_missing": lambda beta: 1.0}
LOGPS_MISTAKES = ("mask_ignored", "masked_mean", "mean_over_time")
LOSS_FORMULA_MISTAKES = ("z_not_detached", "z_detached", "z_clamped", "z_not_clamped", "undesirable_sign",
                         "weights_normalise_mean", "weights_ignored")


def torch_kto_pair(mistake=None):
    """TRL <= 0.9's kto_pair form (z of the other class, clamped, attached), with a mistake when asked."""
    torch = torch_or_skip()

    def candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight):
        if mistake == "weights_ignored":
            desirable_weight = undesirable_weight = 1.0
        b = BETA_MISTAKES.get(mistake, lambda beta: beta)(beta)
        r = policy_logps - ref_logps
        chosen_kl, rejected_kl = r[labels].mean().clamp(min=0), r[~labels].mean().clamp(min=0)
        if mistake == "z_detached":
            chosen_kl, rejected_kl = chosen_kl.detach(), rejected_kl.detach()
        losses = torch.where(labels, desirable_weight * (1 - torch.sigmoid(b * (r - rejected_kl))),
                             undesirable_weight * (1 - torch.sigmoid(b * (chosen_kl - r))))
        return losses.mean()

    return candidate


def torch_kto_loss(variant, mistake=None):
    torch_or_skip()
    if variant == "kto_pair":
        return torch_kto_pair(mistake)
    if mistake in LOSS_FORMULA_MISTAKES:
        return torch_kto_loss_mutant(variant, mistake)
    stop_z_grad = variant == "edifice_stop_z_grad"
    scale_beta = BETA_MISTAKES.get(mistake, lambda beta: beta)

    def candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                  kl_policy_logps=None, kl_ref_logps=None):
        return torch_reference.kto_loss(
            policy_logps, ref_logps, labels, scale_beta(beta), desirable_weight, undesirable_weight,
            kl_policy_logps, kl_ref_logps, variant="edifice" if stop_z_grad else variant, stop_z_grad=stop_z_grad)

    return candidate


def torch_kto_loss_mutant(variant, mistake):
    """The loss with a mistake inside its formula (z handling, the undesirable sign, the mean)."""
    torch = torch_or_skip()

    def candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                  kl_policy_logps=None, kl_ref_logps=None):
        if mistake == "weights_ignored":
            desirable_weight = undesirable_weight = 1.0
        b = beta
        r = policy_logps - ref_logps
        w = torch.where(labels, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
        if variant.startswith("edifice"):
            kl = b * r
            z = kl.mean()
            stop = (variant == "edifice_stop_z_grad") != (mistake in ("z_not_detached", "z_detached"))
            if stop:
                z = z.detach()
            if mistake == "z_clamped":
                z = z.clamp(min=0)
            undesirable_arg = -kl - z if mistake == "undesirable_sign" else -(kl - z)
            losses = torch.where(labels, -desirable_weight * torch.sigmoid(kl - z),
                                 -undesirable_weight * torch.sigmoid(undesirable_arg))
        elif variant == "kto":
            z = torch.zeros((), dtype=r.dtype)
            if kl_policy_logps is not None:
                z = (kl_policy_logps - kl_ref_logps).mean()
                if mistake != "z_not_clamped":
                    z = z.clamp(min=0)
                if mistake != "z_not_detached":
                    z = z.detach()
            undesirable_arg = -b * r - b * z if mistake == "undesirable_sign" else b * (z - r)
            losses = w * torch.where(labels, 1 - torch.sigmoid(b * (r - z)), 1 - torch.sigmoid(undesirable_arg))
        else:
            losses = w * torch.where(labels, 1 - torch.sigmoid(b * r), torch.sigmoid(b * r))
        if mistake == "weights_normalise_mean":
            return losses.sum() / w.sum()
        return losses.mean()

    return candidate


def torch_dpo_loss(mistake=None):
    torch_or_skip()
    scale_beta = BETA_MISTAKES.get(mistake, lambda beta: beta)

    def candidate(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
        return torch_reference.dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, scale_beta(beta))

    return candidate


def torch_token_logps(torch, logits, tokens, mask, shift, mistake=None):
    """torch_reference.sequence_logps, with the mask or the sum mistaken when asked."""
    if mistake == "mask_ignored":
        return torch_reference.sequence_logps(logits, tokens, torch.ones_like(mask), shift)
    total = torch_reference.sequence_logps(logits, tokens, mask, shift)
    if mistake == "masked_mean":
        return total / mask[:, shift:].sum(-1)
    if mistake == "mean_over_time":
        return total / (logits.shape[1] - shift)
    return total


def torch_logprobs(shift, mistake=None):
    torch = torch_or_skip()

    def candidate(logits, tokens, mask):
        s = shift + {"logits_not_shifted": -1, "logits_shifted_twice": 1, "logits_shifted": 1}.get(mistake, 0)
        return torch_token_logps(torch, logits, tokens, mask, s, mistake)

    return candidate


def torch_model_kto(mistake=None, roll=1):
    """The oracle's Hugging Face-named GPT-2 through torch_reference.gpt2_logits (untied lm_head).
    roll: torch.roll's shift of the KL completions (1: TRL's prompt i with completion i - 1; -1: i + 1)."""
    torch = torch_or_skip()
    rotation = {"kl_pairs_not_mismatched": 0, "kl_pairs_rotated_wrong_way": -roll}.get(mistake, roll)
    shift = {"logits_not_shifted": 0, "logits_shifted_twice": 2}.get(mistake, 1)
    logps_mistake = mistake if mistake in LOGPS_MISTAKES else None
    loss = torch_kto_loss("kto", mistake)

    def candidate(state_dict, config, prompt_tokens, completion_tokens, completion_mask, labels, ref_logps,
                  kl_ref_logps, beta, desirable_weight, undesirable_weight):
        params = {name.removeprefix("transformer."): value for name, value in state_dict.items()}

        def logps(completions, masks):
            tokens = torch.cat([prompt_tokens, completions], dim=1)
            mask = torch.cat([torch.zeros(prompt_tokens.shape, dtype=masks.dtype), masks], dim=1)
            logits = torch_reference.gpt2_logits(params, tokens, num_heads=config["n_head"], tie_embeddings=False,
                                                 layer_norm_eps=config["layer_norm_epsilon"])
            return torch_token_logps(torch, logits, tokens, mask, shift, logps_mistake)

        policy_logps = logps(completion_tokens, completion_mask)
        kl_policy_logps = logps(torch.roll(completion_tokens, rotation, 0), torch.roll(completion_mask, rotation, 0))
        return loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                    kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)

    return candidate


def torch_candidate(kind, variant, mistake=None):
    if kind == "kto_loss":
        return torch_kto_loss(variant, mistake)
    if kind == "dpo_loss":
        return torch_dpo_loss(mistake)
    if kind in ("logprobs", "sequence_logprobs"):
        return torch_logprobs(0 if kind == "logprobs" else 1, mistake)
    return torch_model_kto(mistake)


# ---------------------------------------------------------------------------------------------------
# correct implementations pass


@pytest.mark.parametrize("kind,variant", KIND_VARIANTS)
def test_our_functions_pass_every_case(kind, variant):
    report = oracle.verify(builtin(kind, variant), kind, variant)
    assert_passed(report)
    assert report.diagnosis.mistakes == ()
    assert {c.source for c in report.checks} == {"returned"} | ({"vjp"} if "logprobs" in kind else set())


@pytest.mark.parametrize("kind,variant", KIND_VARIANTS)
def test_torch_reimplementation_passes_every_case(kind, variant):
    report = oracle.verify(torch_candidate(kind, variant), kind, variant)
    assert_passed(report)
    gradient_sources = {c.source for c in report.checks if c.quantity.startswith("grad/")}
    assert gradient_sources == {"autograd"}, report


@pytest.mark.parametrize("variant", oracle.VARIANTS["kto_loss"])
def test_numpy_loss_only_candidate_passes_with_finite_differences(variant):
    report = oracle.verify(numpy_kto_loss(variant), "kto_loss", variant)
    assert_passed(report)
    sources = {c.source for c in report.checks if c.quantity == "grad/policy_logps"}
    assert sources == ({"not checked"} if variant == "edifice_stop_z_grad" else {"finite differences"})


@pytest.mark.parametrize("kind,shift", [("logprobs", 0), ("sequence_logprobs", 1)])
def test_numpy_logprobs_candidate_passes_with_finite_differences(kind, shift):
    report = oracle.verify(numpy_logprobs(shift), kind)
    assert_passed(report)
    assert {c.source for c in report.checks if c.quantity == "grad/logits"} == {"finite differences"}


def test_numpy_dpo_candidate_passes_with_finite_differences():
    assert_passed(oracle.verify(numpy_dpo_loss(), "dpo_loss"))


def test_model_candidate_without_gradients_is_checked_by_directional_differences():
    """A NumPy model candidate returning the loss only: directional finite differences check every
    parameter where z_ref is clamped (constant); where it is not, they would see the detached path."""
    ours = oracle.builtin_candidate("model_kto")

    def loss_only(**kwargs):
        return ours(**kwargs)["loss"]

    report = oracle.verify(loss_only, "model_kto")
    assert_passed(report)
    sources = {(c.case.rsplit("/", 1)[1], c.source) for c in report.checks if c.quantity.startswith("grad/")}
    assert sources == {("kl_negative", f"finite differences ({oracle.FD_DIRECTIONS} directions)"),
                       ("kl_positive", "not checked")}


def test_float32_candidate_passes_float32_tolerance_only():
    torch = torch_or_skip()
    float64_candidate = torch_kto_loss("kto")

    def float32_candidate(**kwargs):
        cast = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in kwargs.items()}
        return float64_candidate(**cast)

    strict = oracle.verify(float32_candidate, "kto_loss", "kto")
    assert not strict.passed
    assert any("tolerance='float32'" in note for note in strict.notes), strict
    assert_passed(oracle.verify(float32_candidate, "kto_loss", "kto", tolerance="float32"))


# ---------------------------------------------------------------------------------------------------
# every known mistake fails with its own diagnosis

LOSS_MUTANTS = [
    ("kto_loss", variant, mistake)
    for variant, mistakes in [
        ("edifice", ["z_detached", "z_clamped", "undesirable_sign", "beta_twice", "beta_missing",
                     "weights_normalise_mean", "weights_ignored"]),
        ("edifice_stop_z_grad", ["z_not_detached", "z_clamped", "undesirable_sign", "beta_twice", "beta_missing",
                                 "weights_normalise_mean", "weights_ignored"]),
        ("kto", ["z_not_detached", "z_not_clamped", "undesirable_sign", "beta_twice", "beta_missing",
                 "weights_normalise_mean", "weights_ignored"]),
        ("apo_zero_unpaired", ["beta_twice", "beta_missing", "weights_normalise_mean", "weights_ignored"]),
        ("kto_pair", ["z_detached", "beta_twice", "beta_missing", "weights_ignored"]),
    ]
    for mistake in mistakes
] + [("dpo_loss", None, "beta_twice"), ("dpo_loss", None, "beta_missing")]
# the mistake's form as written in the candidate -> the mistake the diagnosis must name
LOGPROB_FORMS = {"masked_mean": "logps_mean_not_sum", "mean_over_time": "logps_mean_not_sum"}
LOGPROB_MUTANTS = (
    [("logprobs", None, m) for m in ("masked_mean", "mean_over_time", "mask_ignored", "logits_shifted")]
    + [("sequence_logprobs", None, m) for m in ("masked_mean", "mean_over_time", "mask_ignored",
                                                 "logits_not_shifted", "logits_shifted_twice")]
)
MODEL_MUTANTS = [("model_kto", "kto", m) for m in (
    "kl_pairs_not_mismatched", "kl_pairs_rotated_wrong_way", "z_not_detached", "z_not_clamped",
    "logits_not_shifted", "logits_shifted_twice", "masked_mean", "mean_over_time", "mask_ignored",
    "undesirable_sign", "beta_twice", "beta_missing", "weights_normalise_mean", "weights_ignored")]
ALL_MUTANTS = LOSS_MUTANTS + LOGPROB_MUTANTS + MODEL_MUTANTS


def test_every_builtin_mutant_is_covered_by_a_test_candidate():
    tested = {(kind, variant, LOGPROB_FORMS.get(form, form)) for kind, variant, form in ALL_MUTANTS}
    builtin = {(kind, variant, m.mistake) for kind, variant in KIND_VARIANTS
               for m in mistakes.mutants(kind, variant)
               if not set(mistakes.mistake_ids(m)) & REAL_CODE_MISTAKES}
    assert builtin == tested
    assert {m for _, _, m in builtin} == set(oracle.MISTAKES) - REAL_CODE_MISTAKES


@pytest.mark.parametrize("kind,variant,form", ALL_MUTANTS)
def test_torch_mutant_fails_with_its_diagnosis(kind, variant, form):
    report = oracle.verify(torch_candidate(kind, variant, form), kind, variant)
    assert_diagnosed(report, LOGPROB_FORMS.get(form, form))


@pytest.mark.parametrize("kind,variant,form", [
    ("kto_loss", "kto", "beta_twice"), ("kto_loss", "kto", "z_not_clamped"),
    ("kto_loss", "kto", "undesirable_sign"), ("kto_loss", "edifice", "z_clamped"),
    ("kto_loss", "edifice", "undesirable_sign"), ("kto_loss", "apo_zero_unpaired", "weights_normalise_mean"),
    ("kto_loss", "kto_pair", "beta_twice"), ("kto_loss", "kto_pair", "weights_ignored"),
    ("dpo_loss", None, "beta_missing"), ("logprobs", None, "mask_ignored"), ("logprobs", None, "masked_mean"),
    ("sequence_logprobs", None, "logits_not_shifted"), ("sequence_logprobs", None, "logits_shifted_twice"),
])
def test_numpy_mutant_fails_with_its_diagnosis(kind, variant, form):
    if kind == "kto_loss":
        candidate = numpy_kto_loss(variant, form)
    elif kind == "dpo_loss":
        candidate = numpy_dpo_loss(form)
    else:
        candidate = numpy_logprobs(0 if kind == "logprobs" else 1, form)
    assert_diagnosed(oracle.verify(candidate, kind, variant), LOGPROB_FORMS.get(form, form))


def test_mutant_returning_its_own_gradient_is_diagnosed():
    """A NumPy candidate that returns (loss, grad, metrics) computed with z left attached (Edifice
    stop-gradient variant): the returned gradient is compared, and the diagnosis names the mistake."""
    from kto_np.losses import kto_loss_and_grad

    def attached_z(**kwargs):
        return kto_loss_and_grad(**kwargs, variant="edifice", stop_z_grad=False, warn_balance=False)

    report = oracle.verify(attached_z, "kto_loss", "edifice_stop_z_grad")
    assert_diagnosed(report, "z_not_detached")
    assert {c.source for c in report.checks if c.quantity == "grad/policy_logps"} == {"returned"}
    assert all(c.passed for c in report.checks if c.quantity.startswith("metrics/")), report


def test_candidate_converting_numpy_to_torch_is_rerun_with_differentiable_tensors():
    torch = torch_or_skip()
    inner = torch_kto_loss("kto")

    def converts(**kwargs):
        return inner(**{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()})

    report = oracle.verify(converts, "kto_loss", "kto")
    assert_passed(report)
    assert {c.source for c in report.checks if c.quantity.startswith("grad/")} == {"autograd"}


def test_candidate_warnings_become_notes():
    import warnings

    def warns(**kwargs):
        warnings.warn("something odd", RuntimeWarning, stacklevel=1)
        return numpy_kto_loss("apo_zero_unpaired")(**kwargs)

    report = oracle.verify(warns, "kto_loss", "apo_zero_unpaired")
    assert_passed(report)
    assert any("RuntimeWarning: something odd" in note for note in report.notes)


def test_unknown_mistake_is_not_misnamed():
    def sign_flipped(**kwargs):
        return -numpy_kto_loss("kto")(**kwargs)

    report = oracle.verify(sign_flipped, "kto_loss", "kto")
    assert not report.passed
    assert report.diagnosis.mistakes == ()
    assert "no known mistake" in str(report.diagnosis)


# ---------------------------------------------------------------------------------------------------
# the report


def test_report_names_the_wrong_number_side_by_side():
    report = oracle.verify(numpy_kto_loss("kto", "beta_twice"), "kto_loss", "kto")
    failing = [c for c in report.checks if not c.passed and c.quantity == "loss"]
    assert failing, report
    check = failing[0]
    reference = oracle.generate_cases()
    expected = {c.name: c for c in reference}[check.case].expected["loss"]
    assert check.reference_value == float(expected)
    assert check.candidate_value != check.reference_value
    assert check.mismatch_index == ()
    assert check.max_abs_error == pytest.approx(abs(check.candidate_value - check.reference_value))
    text = str(report)
    assert "FAILED" in text and "first mismatch: candidate" in text and "beta_twice" in text
    assert f"{check.candidate_value:.12g}" in text and f"{check.reference_value:.12g}" in text


def test_metrics_returned_in_a_dict_are_compared():
    ours = oracle.builtin_candidate("kto_loss", "kto")

    def with_wrong_margin(**kwargs):
        loss, grad, metrics = ours(**kwargs)
        if metrics["rewards/margins"] is not None:
            metrics["rewards/margins"] *= 2
        return {"loss": loss, "grad": grad, **metrics}

    report = oracle.verify(with_wrong_margin, "kto_loss", "kto")
    failed = {c.quantity for c in report.failures}
    assert failed == {"metrics/rewards/margins"}, report
    assert any(c.quantity == "metrics/rewards/rejected" and c.note.startswith("reference is None")
               for c in report.checks)


def test_candidate_errors_nan_and_bad_shapes_fail():
    def raises(**kwargs):
        raise RuntimeError("boom")

    report = oracle.verify(raises, "kto_loss", "kto")
    assert not report.passed and len(report.errors) == len(report.cases)
    assert "boom" in str(report) and "no case ran to the end" in str(report.diagnosis)

    report = oracle.verify(lambda **kw: (np.nan, np.zeros_like(kw["policy_logps"])), "kto_loss", "kto")
    assert not report.passed and any("NaN" in c.note for c in report.failures)

    report = oracle.verify(lambda **kw: (0.5, np.zeros(3)), "kto_loss", "apo_zero_unpaired")
    assert not report.passed and any("shape" in c.note for c in report.failures)


def test_model_candidate_missing_a_gradient_fails():
    ours = oracle.builtin_candidate("model_kto")

    def drops_one(**kwargs):
        out = ours(**kwargs)
        out["grads"].pop("transformer.h.1.mlp.c_fc.bias")
        return out

    report = oracle.verify(drops_one, "model_kto")
    assert not report.passed
    assert {c.quantity for c in report.failures} == {"grad/transformer.h.1.mlp.c_fc.bias"}


def test_verify_rejects_bad_arguments():
    good = oracle.builtin_candidate()
    with pytest.raises(TypeError, match="candidate"):
        oracle.verify(3.0)
    with pytest.raises(ValueError, match="kind"):
        oracle.verify(good, "ppo_loss")
    with pytest.raises(ValueError, match="variant"):
        oracle.verify(good, "kto_loss", "sigmoid")
    with pytest.raises(ValueError, match="variant"):
        oracle.verify(good, "dpo_loss", "kto")
    with pytest.raises(ValueError, match="tolerance"):
        oracle.verify(good, tolerance="float16")
    with pytest.raises(TypeError, match="cases"):
        oracle.verify(good, cases=42)


# ---------------------------------------------------------------------------------------------------
# export and load


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oracle_cases")
    manifest_path = oracle.export(folder)
    return folder, manifest_path


def test_export_round_trip_is_exact(exported):
    folder, manifest_path = exported
    assert manifest_path == folder / "manifest.json"
    loaded = oracle.load_cases(folder)
    generated = oracle.generate_cases()
    assert [c.name for c in loaded] == [c.name for c in generated]
    for original, back in zip(generated, loaded):
        assert (back.kind, back.variant, back.formula, back.config) == (
            original.kind, original.variant, original.formula, original.config)
        for field in ("inputs", "expected"):
            mine, theirs = getattr(original, field), getattr(back, field)
            assert mine.keys() == theirs.keys(), original.name
            for key, value in mine.items():
                if value is None:
                    assert theirs[key] is None, f"{original.name} {key}"
                    continue
                assert theirs[key].dtype == value.dtype and np.array_equal(theirs[key], value), (
                    f"{original.name} {field}/{key}: {theirs[key]} vs {value}")


def test_export_covers_every_kind_variant_and_edge_case(exported):
    _, manifest_path = exported
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format_version"] == oracle.FORMAT_VERSION
    from kto_np import __version__
    assert manifest["kto_np_version"] == __version__
    assert manifest["tolerances"]["float64"]["loss"]["rtol"] == 1e-9
    names = {e["name"] for e in manifest["cases"]}
    for kind, variant in KIND_VARIANTS:
        assert any(e["kind"] == kind and e["variant"] == variant for e in manifest["cases"])
    for required in ("kto_loss/kto/no_kl_pairs", "kto_loss/kto/kl_pairs", "kto_loss/kto/kl_pairs_negative",
                     "kto_loss/edifice/basic", "kto_loss/edifice_stop_z_grad/basic",
                     "kto_loss/apo_zero_unpaired/batch_of_1", "kto_loss/kto/desirable_only",
                     "kto_loss/kto/extreme_log_ratios", "kto_loss/kto/imbalanced_weights", "dpo_loss/basic",
                     "sequence_logprobs/prompt_and_padding", "model_kto/kto/kl_positive"):
        assert required in names
    assert all(e["formula"] for e in manifest["cases"])
    cases = {c.name: c for c in oracle.load_cases(manifest_path)}
    extreme = cases["kto_loss/kto/extreme_log_ratios"]
    beta_r = float(extreme.inputs["beta"]) * (extreme.inputs["policy_logps"] - extreme.inputs["ref_logps"])
    assert 5e2 < np.abs(beta_r).max() < 2e3
    negative = cases["kto_loss/kto/kl_pairs_negative"].inputs
    assert np.mean(negative["kl_policy_logps"] - negative["kl_ref_logps"]) < 0
    assert np.all(cases["kto_loss/kto/kl_pairs"].expected["grad/kl_policy_logps"] == 0)
    model = cases["model_kto/kto/kl_positive"]
    assert model.config["n_head"] == 3 and model.inputs["prompt_tokens"].shape[0] == 4
    assert "state_dict/transformer.h.1.attn.c_attn.weight" in model.inputs
    assert "grad/transformer.wte.weight" in model.expected and "grad/lm_head.weight" not in model.expected
    rotated = np.roll(model.inputs["completion_tokens"], 1, axis=0)
    assert np.array_equal(model.expected["kl_tokens"][:, 3:], rotated)


def test_exported_files_are_plain_npz_without_pickle(exported):
    folder, _ = exported
    path = folder / "model_kto-kto-kl_positive.npz"
    with np.load(path, allow_pickle=False) as npz:
        assert "inputs/state_dict/transformer.wpe.weight" in npz.files
        assert npz["expected/loss"].dtype == np.float64


def test_export_is_deterministic_and_refuses_a_non_empty_folder(exported, tmp_path):
    folder, _ = exported
    again = tmp_path / "again"
    oracle.export(again)
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    second = {p.name: p.read_bytes() for p in again.iterdir()}
    assert first.keys() == second.keys() and first == second
    with pytest.raises(FileExistsError, match="out_dir"):
        oracle.export(again)
    (again / "stale.txt").write_text("kept")
    oracle.export(again, overwrite=True)
    assert {p.name: p.read_bytes() for p in again.iterdir() if p.name != "stale.txt"} == first
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        oracle.export(not_a_folder)


def copy_of(folder, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for p in folder.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    return target


def test_newer_format_version_is_refused(exported, tmp_path):
    folder = copy_of(exported[0], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = oracle.FORMAT_VERSION + 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json.*newer"):
        oracle.load_cases(folder)
    with pytest.raises(ValueError, match="newer"):
        oracle.verify(oracle.builtin_candidate(), cases=folder)


def test_missing_file_is_refused(exported, tmp_path):
    folder = copy_of(exported[0], tmp_path)
    (folder / "kto_loss-kto-kl_pairs.npz").unlink()
    with pytest.raises(ValueError, match=r"kto_loss-kto-kl_pairs\.npz: missing file"):
        oracle.load_cases(folder)
    with pytest.raises(ValueError, match="missing file"):
        oracle.load_cases(tmp_path / "nowhere")


def test_truncated_array_is_refused_never_a_false_pass(exported, tmp_path):
    folder = copy_of(exported[0], tmp_path)
    path = folder / "kto_loss-kto-kl_pairs.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"kto_loss-kto-kl_pairs\.npz.*truncated"):
        oracle.load_cases(folder)
    with pytest.raises(ValueError, match="truncated"):
        oracle.verify(oracle.builtin_candidate(), cases=folder)


def test_array_truncated_inside_a_valid_zip_is_refused(exported, tmp_path):
    """A well-formed .npz whose array is shorter than the manifest says, or whose values changed."""
    folder = copy_of(exported[0], tmp_path)
    path = folder / "kto_loss-kto-kl_pairs.npz"
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["inputs/policy_logps"] = arrays["inputs/policy_logps"][:-1]
    np.savez(path, **arrays)
    shorter = r"kto_loss-kto-kl_pairs\.npz.*'inputs/policy_logps'.*float64\[7\].*float64\[8\]"
    with pytest.raises(ValueError, match=shorter):
        oracle.load_cases(folder)
    arrays["inputs/policy_logps"] = np.zeros(8)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"kto_loss-kto-kl_pairs\.npz.*sha256"):
        oracle.load_cases(folder)


def test_manifest_that_does_not_match_is_refused(exported, tmp_path):
    folder = copy_of(exported[0], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["cases"][0]["arrays"]["inputs/extra"] = "float64[1]"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"do not match the manifest.*inputs/extra"):
        oracle.load_cases(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json"):
        oracle.load_cases(folder)


def test_verify_on_exported_cases_matches_in_memory(exported):
    folder, _ = exported
    assert_passed(oracle.verify(oracle.builtin_candidate("model_kto"), "model_kto", cases=folder))
    report = oracle.verify(numpy_kto_loss("kto", "z_not_clamped"), "kto_loss", "kto", cases=folder)
    assert_diagnosed(report, "z_not_clamped")


def test_npz_zip_entries_have_fixed_timestamps(exported):
    folder, _ = exported
    with zipfile.ZipFile(folder / "dpo_loss-basic.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {files.ZIP_DATE_TIME}
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = next(e for e in manifest["cases"] if e["file"] == "dpo_loss-basic.npz")
    assert entry["sha256"] == hashlib.sha256((folder / "dpo_loss-basic.npz").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# load_callable and the command-line entry points

CANDIDATE_SOURCE = '''
from kto_np import oracle

good = oracle.builtin_candidate("kto_loss", "kto")

def beta_twice(**kwargs):
    kwargs["beta"] = kwargs["beta"] ** 2
    return good(**kwargs)

not_callable = 3
'''


def test_load_callable_finds_functions_and_names_what_is_wrong(tmp_path):
    from kto_np.losses import kto_loss
    assert oracle.load_callable("kto_np.losses:kto_loss") is kto_loss
    source = tmp_path / "my_candidate.py"
    source.write_text(CANDIDATE_SOURCE)
    assert callable(oracle.load_callable(f"{source}:beta_twice"))
    with pytest.raises(ValueError, match="spec"):
        oracle.load_callable("kto_np.losses.kto_loss")
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        oracle.load_callable("no_such_module_xyz:f")
    with pytest.raises(ImportError, match="no file"):
        oracle.load_callable(f"{tmp_path / 'absent.py'}:f")
    with pytest.raises(AttributeError, match="'missing'"):
        oracle.load_callable("kto_np.losses:missing")
    with pytest.raises(TypeError, match="not a callable"):
        oracle.load_callable(f"{source}:not_callable")
    with pytest.raises(TypeError, match="spec"):
        oracle.load_callable(None)


def test_main_check_and_main_export_exit_status(tmp_path, capsys):
    source = tmp_path / "my_candidate.py"
    source.write_text(CANDIDATE_SOURCE)
    assert oracle.main_check(f"{source}:good", "kto_loss", "kto") == 0
    assert "PASSED" in capsys.readouterr().out
    assert oracle.main_check(f"{source}:beta_twice", "kto_loss", "kto") == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "beta_twice" in out
    assert oracle.main_check("nonexistent_module_xyz:f", "kto_loss", "kto") == 2
    assert "nonexistent_module_xyz" in capsys.readouterr().err
    assert oracle.main_export(tmp_path / "cases", False) == 0
    assert "manifest" in capsys.readouterr().out
    assert oracle.main_export(tmp_path / "cases", False) == 1
    assert "not empty" in capsys.readouterr().err
    assert oracle.main_check(f"{source}:good", "kto_loss", "kto", tmp_path / "cases") == 0


# ---------------------------------------------------------------------------------------------------
# the mutated formulas themselves


def test_mutant_engine_without_mistakes_is_the_reference():
    """_kto_family with no mistake switched on reproduces losses.py on every loss-level case; the other-class
    formula (_other_class_z, written separately) reproduces the kto_pair variant's reference, which cases.py
    composes from losses.py."""
    for case in oracle.generate_cases():
        if case.kind != "kto_loss":
            continue
        engine = (mistakes._other_class_mutant() if case.variant == "kto_pair"
                  else mistakes._kto_loss_mutant("none", {}))
        outputs = engine.compute(case)
        for quantity, value in outputs.items():
            expected = case.expected[quantity]
            assert np.allclose(value, expected, rtol=1e-12, atol=1e-15), (
                f"{case.name} {quantity}: engine {value} vs reference {expected}")


# ---------------------------------------------------------------------------------------------------
# the KL-row rotation is declared, not assumed; unit weights; an exactly-zero KL log-ratio


@pytest.mark.parametrize("roll,kl_rotation", [(1, -1), (-1, 1)])
def test_a_consistent_kl_rotation_passes_and_the_other_is_named(roll, kl_rotation):
    """torch.roll(c, 1) is TRL's rotation (-1: completion i - 1), torch.roll(c, -1) OpenRLHF's and HALOs'
    (+1: completion i + 1): each passes the cases declared for it and fails the others' with the name."""
    candidate = torch_model_kto(roll=roll)
    report = oracle.verify(candidate, "model_kto", kl_rotation=kl_rotation)
    assert_passed(report)
    assert f"kl_rotation={kl_rotation:+d}" in str(report)
    assert_diagnosed(oracle.verify(candidate, "model_kto", kl_rotation=-kl_rotation), "kl_pairs_rotated_wrong_way")
    assert_passed(oracle.verify(oracle.builtin_candidate("model_kto", kl_rotation=kl_rotation), "model_kto",
                                kl_rotation=kl_rotation))
    with pytest.raises(ValueError, match="kl_rotation"):
        oracle.verify(candidate, "model_kto", kl_rotation=0)


def test_the_cases_of_each_rotation_hold_reference_values_for_it():
    from kto_np.oracle.cases.reference import kl_partner_indices

    by_name = {c.name: c for c in oracle.generate_cases() if c.kind == "model_kto"}
    for name, case in by_name.items():
        rotation = case.kl_rotation
        partners = kl_partner_indices(4, rotation)
        completions = case.inputs["completion_tokens"][partners]
        assert np.array_equal(case.expected["kl_tokens"][:, 3:], completions), name
        assert np.array_equal(partners, (np.arange(4) + rotation) % 4)
    assert {c.kl_rotation for c in by_name.values()} == {-1, 1}


def test_a_weightless_implementation_passes_the_unit_weight_cases_only_and_is_named():
    for variant in oracle.VARIANTS["kto_loss"]:
        candidate = torch_kto_loss(variant, "weights_ignored")
        report = oracle.verify(candidate, "kto_loss", variant)
        assert_diagnosed(report, "weights_ignored")
        unit = [c for c in report.checks if c.case.endswith("/unit_weights")]
        assert unit and all(c.passed for c in unit), report


def test_kl_zero_case_is_exactly_zero_and_z_not_detached_is_still_named():
    case = next(c for c in oracle.generate_cases() if c.name == "kto_loss/kto/kl_zero")
    assert np.mean(case.inputs["kl_policy_logps"] - case.inputs["kl_ref_logps"]) == 0.0
    assert case.expected["metrics/kl"] == 0.0
    report = oracle.verify(torch_kto_loss("kto", "z_not_detached"), "kto_loss", "kto")
    assert any(c.case.endswith("/kl_zero") and not c.passed for c in report.checks), report
    assert report.diagnosis.mistakes == ("z_not_detached",)


# ---------------------------------------------------------------------------------------------------
# a verdict readable at a glance


def _beta_twice_module(tmp_path):
    source = tmp_path / "beta_twice_kto.py"
    source.write_text(
        "from kto_np import oracle\n"
        "ours = oracle.builtin_candidate('kto_loss', 'kto')\n\n\n"
        "def kto_loss(**inputs):\n"
        "    return ours(**{**inputs, 'beta': inputs['beta'] ** 2})\n")
    return source


def test_the_first_line_is_the_verdict_and_the_table_shows_the_failing_rows(tmp_path, capsys):
    source = _beta_twice_module(tmp_path)
    report = oracle.verify(f"{source}:kto_loss", "kto_loss", "kto")
    lines = str(report).splitlines()
    assert lines[0].startswith("FAILED, diagnosis: matches known mistake beta_twice"), lines[0]
    rows = [line for line in lines if line.endswith(("FAIL", "pass", "skip"))]
    assert rows and all(line.endswith("FAIL") for line in rows)
    assert len(rows) == MAX_FAILING_ROWS < len(report.failures)
    every = report.format(show_all=True).splitlines()
    assert every[0] == lines[0]
    assert sum(line.endswith("pass") for line in every) == sum(c.passed for c in report.checks)
    assert oracle.verify(oracle.builtin_candidate(), "kto_loss").verdict.startswith("PASSED, diagnosis: all checks")
    status = oracle.main_check(f"{source}:kto_loss")
    out = capsys.readouterr().out
    assert status == 1 and out.startswith("FAILED, diagnosis: matches known mistake beta_twice")
    assert " pass\n" not in out
    from kto_np.cli import main

    assert main(["oracle", "check", f"{source}:kto_loss", "--all"]) == 1
    assert " pass\n" in capsys.readouterr().out


def test_a_failing_assert_kto_matches_fits_one_screen_in_pytest(tmp_path):
    """The user's line and the verdict, without assert_kto_matches' own source (__tracebackhide__)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _beta_twice_module(tmp_path)
    (tmp_path / "test_user.py").write_text(
        "from beta_twice_kto import kto_loss\n"
        "from kto_np.testing import assert_kto_matches\n\n\n"
        "def test_my_kto_loss():\n"
        "    assert_kto_matches(kto_loss)\n")
    root = str(Path(oracle.__file__).resolve().parents[2])
    # A user's terminal: pytest prints the whole message in the short summary when CI or BUILD_NUMBER is set
    # (it truncates to one line elsewhere), so those two are left out of the child's environment.
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "BUILD_NUMBER")}
    env.update(PYTHONPATH=os.pathsep.join([root, str(tmp_path)]), COLUMNS="120")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 1, out
    lines = out.splitlines()
    assert len(lines) <= 40, out
    assert "def assert_kto_matches" not in out and "__tracebackhide__" not in out
    user_line = next(i for i, line in enumerate(lines) if line.startswith(">       assert_kto_matches(kto_loss)"))
    assert lines[user_line + 1].startswith("E       AssertionError: FAILED, diagnosis: matches known mistake "
                                           "beta_twice"), out
    summary = next(line for line in lines if line.startswith("FAILED test_user.py"))
    assert "AssertionError: FAILED, diagnosis: matches known mistake" in summary
