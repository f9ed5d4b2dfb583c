"""The oracle's model_edifice kind: Edifice's network, Axon names, the seed's unshifted contract.

The candidates below are independent of the reference: loss-only ones get their gradients by the
oracle's finite differences of their own loss, and the mistakes are written out by hand.
"""

import copy
import json

import numpy as np
import pytest

import kto_np
from kto_np import oracle
from kto_np.checkpoint import params_to_axon
from kto_np.oracle.cases.reference import generate_cases
from kto_np.oracle.compare.results import ResultsError, compare_results, results_document, write_results

KIND, VARIANT = "model_edifice", "edifice"
BUILTIN = oracle.builtin_candidate(KIND)


def edifice_cases():
    return [c for c in generate_cases() if c.kind == KIND]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def edifice_kto_loss(logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, *, beta_power=1,
                     undesirable_sign=1.0, clamp=False, normalise=False, ignore_weights=False):
    """Edifice's loss written out: KL_i = beta r_i, z = mean KL (in the graph), -w sigma(+-(KL - z)); the
    keywords are the known mistakes (beta^power, sigma(-KL - z), z clamped, sum w loss / sum w, w = 1)."""
    kl = beta ** beta_power * (np.asarray(logps) - np.asarray(ref_logps))
    z = max(kl.mean(), 0.0) if clamp else kl.mean()
    undesirable = sigmoid(-kl - z) if undesirable_sign < 0 else sigmoid(-(kl - z))
    weights = np.where(labels, 1.0, 1.0) if ignore_weights else np.where(labels, desirable_weight, undesirable_weight)
    losses = np.where(labels, -weights * sigmoid(kl - z), -weights * undesirable)
    return float(losses.sum() / (weights.sum() if normalise else len(losses)))


def public_api_model(params, config):
    """The seed API: kto_np.build(architecture="edifice", ...) with the case's config."""
    model = kto_np.build(hidden_size=config["hidden_size"], num_layers=config["num_layers"],
                         num_heads=config["num_heads"], vocab_size=config["vocab_size"], dropout=0.0,
                         max_seq_len=config["max_seq_len"], dtype="float64", architecture="edifice",
                         token_embedding=config["token_embedding"])
    return model, {k: np.asarray(v) for k, v in params.items()}


def public_api_loss(params, config, tokens, targets, mask, labels, ref_logps, beta, desirable_weight,
                    undesirable_weight):
    """Loss only, through the public API: build -> forward -> compute_logprobs -> kto_loss."""
    model, params = public_api_model(params, config)
    logits, _ = model.forward(params, tokens)
    logps = kto_np.compute_logprobs(logits, targets, mask)
    loss = kto_np.kto_loss(logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, warn_balance=False)
    return {"loss": loss, "logits": logits, "logps": logps}


def loss_with(*, shift=0, reduction="sum", mask_ignored=False, prompt_in_mask=False, **loss_options):
    """A loss-only candidate with a hand-written log-prob and loss; the keywords are the known mistakes:
    shift 1 (logits[:, t] score targets[:, t + 1]), token log-probs averaged, the mask ignored, the prompt
    position inside the mask, and edifice_kto_loss's."""
    def candidate(params, config, tokens, targets, mask, labels, ref_logps, beta, desirable_weight,
                  undesirable_weight):
        model, params = public_api_model(params, config)
        logits, _ = model.forward(params, tokens)
        z = logits - logits.max(axis=-1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [B, T, V]
        T = logits.shape[1]
        picked = np.take_along_axis(log_softmax[:, :T - shift], targets[:, shift:, None], axis=-1)[..., 0]
        if prompt_in_mask:  # the positions before the completion counted too
            mask = np.where(np.cumsum(mask, axis=1) == 0, 1.0, mask)
        weights = np.ones_like(picked) if mask_ignored else mask[:, shift:]
        if reduction == "masked_mean":
            weights = weights / weights.sum(axis=1, keepdims=True)
        elif reduction == "mean_over_time":
            weights = weights / picked.shape[1]
        logps = (picked * weights).sum(axis=1)
        return edifice_kto_loss(logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, **loss_options)
    return candidate


def z_detached(params, config, tokens, targets, mask, labels, ref_logps, beta, desirable_weight,
               undesirable_weight):
    """Gradients returned with z detached (kto_np's stop_z_grad), through the public API's pieces."""
    model, params = public_api_model(params, config)
    logits, cache = model.forward(params, tokens)
    logps, logps_cache = kto_np.logprobs.logprobs_forward(logits, targets, mask)
    loss, dlogps, _ = kto_np.losses.kto_loss_and_grad(logps, ref_logps, labels, beta, desirable_weight,
                                                      undesirable_weight, variant="edifice", stop_z_grad=True,
                                                      warn_balance=False)
    return loss, model.backward(kto_np.logprobs.logprobs_backward(dlogps, logps_cache), cache)


MUTANT_CANDIDATES = {  # the mutant's label -> (a candidate with that mistake, the mistake the diagnosis names)
    "logits_shifted": (loss_with(shift=1), "logits_shifted"),
    "masked mean": (loss_with(reduction="masked_mean"), "logps_mean_not_sum"),
    "mean over T": (loss_with(reduction="mean_over_time"), "logps_mean_not_sum"),
    "mask_ignored": (loss_with(mask_ignored=True), "mask_ignored"),
    "prompt_in_mask": (loss_with(prompt_in_mask=True), "prompt_in_mask"),
    "z_detached": (z_detached, "z_detached"),
    "z_clamped": (loss_with(clamp=True), "z_clamped"),
    "undesirable_sign": (loss_with(undesirable_sign=-1.0), "undesirable_sign"),
    "beta_twice": (loss_with(beta_power=2), "beta_twice"),
    "beta_missing": (loss_with(beta_power=0), "beta_missing"),
    "weights_normalise_mean": (loss_with(normalise=True), "weights_normalise_mean"),
    "weights_ignored": (loss_with(ignore_weights=True), "weights_ignored"),
}


def test_builtin_candidate_passes_every_case_in_process_and_isolated(capsys):
    report = oracle.verify(BUILTIN, kind=KIND, isolate=False)
    assert report.passed and not report.not_verified
    assert report.cases == [c.name for c in edifice_cases()] and len(report.cases) == 2
    quantities = {c.quantity for c in report.checks}
    assert {"loss", "logits", "logps", "grad/block_1_attn_q.kernel", "grad/lm_head.bias",
            "grad/token_embed.kernel"} <= quantities
    assert oracle.main_check("kto_np.oracle.run.candidates:edifice_candidate", KIND) == 0
    out = capsys.readouterr().out
    assert "kind=model_edifice variant=edifice, 2 cases" in out and "PASSED: 79/79" in out


def test_public_api_loss_only_candidate_passes_by_finite_differences():
    report = oracle.verify(public_api_loss, kind=KIND, isolate=False)
    assert report.passed, report
    grads = [c for c in report.checks if c.quantity.startswith("grad/")]
    assert len(grads) == 2 * 36 + 1 and all(c.source.startswith("finite differences") for c in grads)
    # the differences are of the candidate's loss, compared with the stored hand-written gradients (at the
    # finite-difference tolerance): a wrong stored gradient would show here
    assert all(c.passed and (c.rtol, c.atol) == oracle.TOLERANCES["float64"]["finite_differences"] for c in grads)


def test_nested_axon_params_and_grads_are_accepted():
    def nested(params, config, **inputs):
        out = BUILTIN(params_to_axon(params), config, **inputs)  # the builtin reads Axon's nested layout too
        return {**out, "grads": params_to_axon(out["grads"])}
    assert oracle.verify(nested, kind=KIND, isolate=False).passed


def test_the_cases_follow_the_unshifted_contract():
    for case in edifice_cases():
        inputs, expected = case.inputs, case.expected
        logits = expected["logits"]
        log_softmax = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_softmax, inputs["targets"][..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(expected["logps"], (picked * inputs["mask"]).sum(axis=1), rtol=1e-12)
        np.testing.assert_array_equal(inputs["targets"][:, :-1], inputs["tokens"][:, 1:])  # the shift is in the data
        loss = edifice_kto_loss(expected["logps"], inputs["ref_logps"], inputs["labels"], float(inputs["beta"]),
                                float(inputs["desirable_weight"]), float(inputs["undesirable_weight"]))
        assert abs(loss - float(expected["loss"])) < 1e-12
        assert case.config["architecture"] == "edifice" and case.config["dtype"] == "float64"
        assert all(k.startswith(("params/block_", "params/final_norm.", "params/lm_head.", "params/token_embed."))
                   for k in inputs if "/" in k)


@pytest.mark.parametrize("label", sorted(MUTANT_CANDIDATES))
def test_every_mistake_fails_and_is_named(label):
    candidate, mistake = MUTANT_CANDIDATES[label]
    report = oracle.verify(candidate, kind=KIND, isolate=False)
    assert not report.passed
    assert report.diagnosis.mistakes == (mistake,), report


def test_every_builtin_mutant_has_a_candidate_above():
    from kto_np.oracle.cases.mistakes import mutants

    # the two reference mistakes' candidates are written in test_oracle_mistakes, for every model kind
    labels = {m.label for m in mutants(KIND, VARIANT)} - {"reference_missing", "reference_is_policy"}
    assert labels == set(MUTANT_CANDIDATES)


def test_the_handwritten_loss_passes_without_the_mistake():
    assert oracle.verify(loss_with(), kind=KIND, isolate=False).passed  # the mutants above fail for their mistake


def test_one_wrong_gradient_is_named():
    def wrong_query_kernel(**inputs):
        out = BUILTIN(**inputs)
        grads = dict(out["grads"])
        grads["block_2_attn_q.kernel"] = grads["block_2_attn_q.kernel"] * 1.001
        return out["loss"], grads

    report = oracle.verify(wrong_query_kernel, kind=KIND, isolate=False)
    assert not report.passed
    assert {(c.case, c.quantity) for c in report.failures} == {
        (case.name, "grad/block_2_attn_q.kernel") for case in edifice_cases()}
    assert "grad/block_2_attn_q.kernel" in str(report) and "first mismatch" in str(report)


def test_hugging_face_names_and_missing_tensors_get_clear_messages():
    def hf_names(**inputs):
        out = BUILTIN(**inputs)
        return out["loss"], {f"transformer.h.0.{name}": g for name, g in out["grads"].items()}

    report = oracle.verify(hf_names, kind=KIND, isolate=False)
    assert not report.passed and set(report.errors) == {c.name for c in edifice_cases()}
    message = next(iter(report.errors.values()))
    assert "Hugging Face" in message and "'<layer>.<param>'" in message and "block_1_attn_k.bias" in message

    def missing(**inputs):
        out = BUILTIN(**inputs)
        return out["loss"], {k: v for k, v in out["grads"].items() if k != "final_norm.beta"}

    report = oracle.verify(missing, kind=KIND, isolate=False)
    failed = {(c.quantity, c.note) for c in report.failures}
    assert failed == {("grad/final_norm.beta", "missing from the candidate's gradients")}

    def gpt2_signature(state_dict, config, prompt_tokens, completion_tokens):
        return 0.0

    with pytest.raises(oracle.LoadError, match="params, config, tokens, targets, mask.*model_kto's parameters"):
        oracle.verify(gpt2_signature, kind=KIND, isolate=False)


def test_export_then_load_cases_round_trip(tmp_path):
    oracle.export(tmp_path)
    loaded = {c.name: c for c in oracle.load_cases(tmp_path) if c.kind == KIND}
    for case in edifice_cases():
        other = loaded[case.name]
        assert (other.variant, other.formula, dict(other.config)) == (case.variant, case.formula, dict(case.config))
        assert set(other.inputs) == set(case.inputs) and set(other.expected) == set(case.expected)
        for key, value in case.inputs.items():
            assert other.inputs[key].dtype == value.dtype
            np.testing.assert_array_equal(other.inputs[key], value)
        for key, value in case.expected.items():
            np.testing.assert_array_equal(other.expected[key], value)
    report = oracle.verify(BUILTIN, kind=KIND, cases=tmp_path, isolate=False)
    assert report.passed and report.cases_identical is True

    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = next(e for e in manifest["cases"] if e["kind"] == KIND)
    entry["config"]["dropout"] = 0.1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="invalid Edifice config: dtype must be 'float64' and dropout 0.0"):
        oracle.load_cases(tmp_path)


def test_compare_results_file_from_another_language(tmp_path):
    cases_dir = tmp_path / "cases"
    oracle.export(cases_dir)
    document = results_document(BUILTIN, kind=KIND)
    path = write_results(tmp_path / "results.json", document)
    assert oracle.main_compare(cases_dir, path) == 0

    name = "model_edifice/edifice/learned_embedding"
    wrong = copy.deepcopy(document)
    wrong["results"][name]["grads"]["block_1_ffn_up.bias"][3] += 1e-3
    report = compare_results(cases_dir, wrong)
    assert not report.passed
    assert [(c.case, c.quantity, c.mismatch_index) for c in report.failures] == [
        (name, "grad/block_1_ffn_up.bias", (3,))]

    nested = copy.deepcopy(document)  # Axon's nested layout, as an Elixir map of maps serialises
    for entry in nested["results"].values():
        entry["grads"] = params_to_axon({k: np.array(v) for k, v in entry["grads"].items()})
        entry["grads"] = {layer: {p: v.tolist() for p, v in d.items()} for layer, d in entry["grads"].items()}
    assert compare_results(cases_dir, nested).passed

    hf = copy.deepcopy(document)
    hf["results"][name]["grads"]["transformer.wte.weight"] = [0.0]
    with pytest.raises(ResultsError, match="not this case's parameters: \\['transformer.wte.weight'\\]"):
        compare_results(cases_dir, hf)


def test_every_mutant_differs_from_the_reference():
    from kto_np.oracle.cases.mistakes import mutants

    found = set()
    for mutant in mutants(KIND, VARIANT):
        found.add(mutant.mistake)
        differs = []  # z_clamped shows only where z < 0: in the learned_embedding case
        for case in edifice_cases():
            out = mutant.compute(case)
            differs.append(any(not np.allclose(out[k], case.expected[k], rtol=1e-8, atol=1e-12) for k in out))
        assert any(differs), mutant.label
    assert {"logits_shifted", "undesirable_sign", "beta_twice", "z_detached", "z_clamped", "mask_ignored",
            "logps_mean_not_sum", "prompt_in_mask"} <= found


def torch_edifice(detach_z=False):
    """A torch candidate: test_edifice's PyTorch twin of the network, the unshifted log-probs and Edifice's
    loss written with torch ops; the oracle takes every gradient by autograd."""
    torch = pytest.importorskip("torch", reason="torch not installed: the torch candidate is skipped")
    from test_edifice import _torch_twin_logits

    from kto_np.edifice import EdificeConfig

    def candidate(params, config, tokens, targets, mask, labels, ref_logps, beta, desirable_weight,
                  undesirable_weight):
        logits = _torch_twin_logits(torch, params, tokens, EdificeConfig.from_dict(config))
        logps = (logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) * mask).sum(-1)
        kl = beta * (logps - ref_logps)
        z = kl.mean().detach() if detach_z else kl.mean()
        losses = torch.where(labels, -desirable_weight * torch.sigmoid(kl - z),
                             -undesirable_weight * torch.sigmoid(-(kl - z)))
        return losses.mean()
    return candidate


def test_torch_candidate_passes_with_autograd_and_a_detached_z_is_named():
    report = oracle.verify(torch_edifice(), kind=KIND, isolate=False)
    assert report.passed, report
    assert {c.source for c in report.checks if c.quantity.startswith("grad/")} == {"autograd"}
    report = oracle.verify(torch_edifice(detach_z=True), kind=KIND, isolate=False)
    assert not report.passed and report.diagnosis.mistakes == ("z_detached",), report
