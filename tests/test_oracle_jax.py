"""JAX candidates: gradients from jax.grad, so a z used without stop_gradient is caught and named."""

import textwrap

import pytest

from kto_np import oracle

jax = pytest.importorskip("jax", reason="jax not installed (pip install jax jaxlib): the JAX candidate tests skip")
jnp = pytest.importorskip("jax.numpy", reason="jax not installed")

# four cases keep JAX's op-by-op dispatch short and still decide every known mistake: without KL pairs, with
# them (z_ref > 0), a negative KL estimate (the clamp), undesirable examples only
CASE_NAMES = ("no_kl_pairs", "kl_pairs", "kl_pairs_negative", "undesirable_only")
CASES = [c for c in oracle.generate_cases() if c.kind == "kto_loss" and c.variant == "kto"
         and c.name.rsplit("/", 1)[1] in CASE_NAMES]


def _kto(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps, kl_ref_logps,
         stop_gradient: bool):
    log_ratios = policy_logps - ref_logps
    z = 0.0
    if kl_policy_logps is not None:
        z = jnp.maximum(jnp.mean(kl_policy_logps - kl_ref_logps), 0.0)
        if stop_gradient:
            z = jax.lax.stop_gradient(z)
    desirable = desirable_weight * (1 - jax.nn.sigmoid(beta * (log_ratios - z)))
    undesirable = undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - log_ratios)))
    return jnp.where(labels, desirable, undesirable)  # per-example losses: the oracle takes their mean


def jax_kto(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
            kl_ref_logps=None):
    return jnp.mean(_kto(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                         kl_policy_logps, kl_ref_logps, stop_gradient=True))


def jax_kto_z_not_detached(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                           kl_policy_logps=None, kl_ref_logps=None):
    return jnp.mean(_kto(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                         kl_policy_logps, kl_ref_logps, stop_gradient=False))


def jax_kto_per_example(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                        kl_policy_logps=None, kl_ref_logps=None):
    return _kto(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps,
                kl_ref_logps, stop_gradient=True)


def test_jax_with_stop_gradient_passes_with_gradients_from_jax_grad():
    report = oracle.verify(jax_kto, "kto_loss", "kto", tolerance="float32", isolate=False, cases=CASES)
    assert report.passed, str(report)
    sources = {c.source for c in report.checks if c.quantity.startswith("grad/")}
    assert sources == {"jax.grad"}
    assert any(c.quantity == "grad/kl_policy_logps" and c.passed for c in report.checks)  # compared, not skipped
    assert not report.not_verified
    if not jax.config.read("jax_enable_x64"):
        assert any("JAX_ENABLE_X64" in note for note in report.notes)


def test_jax_without_stop_gradient_is_named_z_not_detached():
    report = oracle.verify(jax_kto_z_not_detached, "kto_loss", "kto", tolerance="float32", isolate=False, cases=CASES)
    assert not report.passed
    failing = {c.quantity for c in report.failures}
    assert "grad/kl_policy_logps" in failing
    assert report.diagnosis.mistakes == ("z_not_detached",), report.diagnosis.message


def test_jax_per_example_losses_are_averaged_and_differentiated():
    report = oracle.verify(jax_kto_per_example, "kto_loss", "kto", tolerance="float32", isolate=False, cases=CASES)
    assert report.passed, str(report)
    assert any("per-example" in note for note in report.notes)


def jax_sequence_logprobs(logits, tokens, completion_mask):
    """The language-model convention: logits at t - 1 score token t."""
    token_logps = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], axis=-1), tokens[:, 1:, None], axis=-1)
    return jnp.sum(token_logps[..., 0] * completion_mask[:, 1:], axis=-1)


def jax_sequence_logprobs_not_shifted(logits, tokens, completion_mask):
    token_logps = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, :, None], axis=-1)
    return jnp.sum(token_logps[..., 0] * completion_mask, axis=-1)


def test_jax_log_probs_differentiated_with_jax_grad():
    good = oracle.verify(jax_sequence_logprobs, "sequence_logprobs", tolerance="float32", isolate=False)
    assert good.passed, str(good)
    assert {c.source for c in good.checks if c.quantity == "grad/logits"} == {"jax.grad"}
    bad = oracle.verify(jax_sequence_logprobs_not_shifted, "sequence_logprobs", tolerance="float32", isolate=False)
    assert bad.diagnosis.mistakes == ("logits_not_shifted",), bad.diagnosis.message


@pytest.mark.slow
def test_jax_at_float64_in_a_child_with_jax_enable_x64(tmp_path, monkeypatch):
    """The child process reads JAX_ENABLE_X64 from the environment: the JAX candidate is then checked at float64
    (every number but the gradient through z agrees to float64 tolerance), and the mistake is still named."""
    (tmp_path / "my_jax_kto.py").write_text(textwrap.dedent('''
        import jax
        import jax.numpy as jnp


        def kto_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                     kl_policy_logps=None, kl_ref_logps=None, detach=True):
            log_ratios = policy_logps - ref_logps
            z = 0.0
            if kl_policy_logps is not None:
                z = jnp.maximum(jnp.mean(kl_policy_logps - kl_ref_logps), 0.0)
                z = jax.lax.stop_gradient(z) if detach else z
            desirable = desirable_weight * (1 - jax.nn.sigmoid(beta * (log_ratios - z)))
            undesirable = undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - log_ratios)))
            return jnp.mean(jnp.where(labels, desirable, undesirable))


        def kto_loss_attached(**kwargs):
            return kto_loss(**kwargs, detach=False)
    '''))
    monkeypatch.setenv("JAX_ENABLE_X64", "1")
    monkeypatch.chdir(tmp_path)
    bad = oracle.verify(f"{tmp_path / 'my_jax_kto.py'}:kto_loss_attached", "kto_loss", "kto", cases=CASES)
    assert bad.tolerance == "float64"
    assert {c.quantity for c in bad.failures} == {"grad/kl_policy_logps"}, str(bad)
    assert bad.diagnosis.mistakes == ("z_not_detached",), str(bad)
    assert not any("JAX_ENABLE_X64" in note for note in bad.notes)
