"""Lesson 10: KTO against DPO."""

import numpy as np


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def reward_margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """10.reward_margins: β[(πc − refc) − (πr − refr)] per pair."""
    return beta * ((np.asarray(policy_chosen_logps) - np.asarray(ref_chosen_logps))
                   - (np.asarray(policy_rejected_logps) - np.asarray(ref_rejected_logps)))


def dpo_loss_and_grad(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """10.dpo_loss: L = mean −log σ(h), dL/dπc = −β σ(−h) / n, dL/dπr = +β σ(−h) / n."""
    h = reward_margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    n = len(h)
    loss = float(np.mean(np.logaddexp(0.0, -h)))  # −log σ(h), stable
    dchosen = -beta * sigmoid(-h) / n
    return loss, dchosen, -dchosen
