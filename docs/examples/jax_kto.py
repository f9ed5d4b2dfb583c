"""A JAX KTO loss checked directly (kto-np oracle check): the oracle differentiates it with jax.grad. The twin
without jax.lax.stop_gradient on z lets gradient flow into the KL pairs."""

import jax
import jax.numpy as jnp


def kto_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
             kl_policy_logps=None, kl_ref_logps=None):
    log_ratios = policy_logps - ref_logps
    z = 0.0
    if kl_policy_logps is not None:
        z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_policy_logps - kl_ref_logps), 0.0))
    desirable = desirable_weight * (1 - jax.nn.sigmoid(beta * (log_ratios - z)))
    undesirable = undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - log_ratios)))
    return jnp.mean(jnp.where(labels, desirable, undesirable))


def kto_loss_z_not_detached(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                            kl_policy_logps=None, kl_ref_logps=None):
    log_ratios = policy_logps - ref_logps
    z = 0.0
    if kl_policy_logps is not None:
        z = jnp.maximum(jnp.mean(kl_policy_logps - kl_ref_logps), 0.0)
    desirable = desirable_weight * (1 - jax.nn.sigmoid(beta * (log_ratios - z)))
    undesirable = undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - log_ratios)))
    return jnp.mean(jnp.where(labels, desirable, undesirable))
