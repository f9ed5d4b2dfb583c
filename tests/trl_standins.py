"""Stand-in KTOTrainer classes in the shape of each TRL release group, for testing `kto-np oracle trl` without TRL.

Written for kto_np from reading each release's kto_trainer.py: the method names, signatures, batch keys and the
way each calls the model are TRL's; the loss inside is ours (the KTO formulas: z_ref = max(0, mean(KL policy -
KL reference)) detached, 1 - sigmoid(beta (r - z)) and 1 - sigmoid(beta (z - r)), weighted, averaged).

  KtoLossTrainer            TRL 0.19 - 1.5: the split-signature kto_loss method
  CompletionKeysTrainer     TRL 1.6 - 1.7: _compute_loss; keys completion_input_ids, completion_attention_mask,
                            completion_mask, KL_completion_*; ref_logps; model(...).logits
  LogitsTrainer             TRL 1.8 - 1.14: _compute_loss; keys input_ids, attention_mask, completion_mask,
                            KL_*; ref_logps; model(...).logits
  FusedHeadTrainer          TRL >= 1.15: as LogitsTrainer, but the model is called with labels (-100 outside the
                            completion) and fused_lm_head=True and answers per-token log_probs

Needs torch: imported without it, the module skips the test that imports it (a helper, not a test file).
"""

from __future__ import annotations

from collections import defaultdict

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: the stand-in TRL paths skip")
F = torch.nn.functional


class StandInConfig:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _Trainer:
    """What the driver touches on a trainer: beta and the weights, loss_type, calculate_KL,
    precompute_ref_logps, _metrics, model.training, get_train_dataloader (a batch of this group's keys)."""

    def __init__(self, loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0):
        self.loss_type, self.beta = loss_type, beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.calculate_KL = loss_type == "kto"
        self.precompute_ref_logps = True
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.model = torch.nn.Linear(1, 1)  # only .training is read

    # -- the loss, ours -----------------------------------------------------------------------------
    def _losses(self, policy_chosen, policy_rejected, policy_kl, ref_chosen, ref_rejected, ref_kl):
        if self.calculate_KL:
            kl = (policy_kl - ref_kl).mean().clamp(min=0).detach()
        else:
            kl = torch.zeros(1, dtype=policy_chosen.dtype)
        chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        if self.loss_type == "kto":
            chosen = 1 - F.sigmoid(self.beta * (chosen_ratio - kl))
            rejected = 1 - F.sigmoid(self.beta * (kl - rejected_ratio))
        else:  # apo_zero_unpaired
            chosen = 1 - F.sigmoid(self.beta * chosen_ratio)
            rejected = F.sigmoid(self.beta * rejected_ratio)
        losses = torch.cat((self.desirable_weight * chosen, self.undesirable_weight * rejected), 0)
        return losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach(), kl

    # -- the collator ---------------------------------------------------------------------------------
    KEYS = {"ids": "input_ids", "attention": "attention_mask", "kl_ids": "KL_input_ids",
            "kl_attention": "KL_attention_mask"}
    EXTRA_KEYS: tuple = ()

    def get_train_dataloader(self):
        ids = torch.tensor([[5, 6, 7], [5, 8, 0], [5, 6, 9], [5, 9, 9]])
        mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]])
        batch = {self.KEYS["ids"]: ids, self.KEYS["attention"]: torch.ones_like(ids), "completion_mask": mask,
                 "label": torch.tensor([True, False, True, False]), "ref_logps": torch.zeros(4),
                 "prompt": ["a", "b", "c", "d"]}
        if self.calculate_KL:
            batch.update({self.KEYS["kl_ids"]: ids.roll(1, 0), self.KEYS["kl_attention"]: torch.ones_like(ids),
                          "KL_completion_mask": mask.roll(1, 0), "ref_KL_logps": torch.zeros(4)})
        for key in self.EXTRA_KEYS:
            batch[key] = torch.zeros_like(ids)
        return iter([batch])

    # -- TRL >= 1.6's entry point ---------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self._compute_loss(model, inputs, return_outputs)

    def _sequence_logps(self, model, ids, attention, completion_mask):
        logits = model(input_ids=ids, attention_mask=attention).logits
        per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
        return (per_token * completion_mask[:, 1:]).sum(-1)

    def _compute_loss(self, model, inputs, return_outputs):
        keys = self.KEYS
        labels = torch.as_tensor(inputs["label"], dtype=torch.bool)
        kl_logps = ref_kl = None
        if self.calculate_KL:
            with torch.no_grad():
                kl_logps = self._sequence_logps(model, inputs[keys["kl_ids"]], inputs[keys["kl_attention"]],
                                                inputs["KL_completion_mask"])
            ref_kl = inputs["ref_KL_logps"]
        logps = self._sequence_logps(model, inputs[keys["ids"]], inputs[keys["attention"]], inputs["completion_mask"])
        ref = inputs["ref_logps"]
        losses, chosen_rewards, rejected_rewards, kl = self._losses(logps[labels], logps[~labels], kl_logps,
                                                                    ref[labels], ref[~labels], ref_kl)
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["kl"].append(kl.item())
        for split, rewards, chosen in (("chosen", chosen_rewards, labels), ("rejected", rejected_rewards, ~labels)):
            if rewards.numel():
                metrics[f"rewards/{split}"].append(rewards.mean().item())
                metrics[f"logps/{split}"].append(logps[chosen].detach().mean().item())
        return losses.nanmean()


class KtoLossTrainer(_Trainer):
    """TRL 0.19 - 1.5: kto_loss(policy_chosen_logps, policy_rejected_logps, policy_KL_logps,
    reference_chosen_logps, reference_rejected_logps, reference_KL_logps) -> (losses, chosen_rewards,
    rejected_rewards, kl)."""

    def kto_loss(self, policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                 reference_rejected_logps, reference_KL_logps):
        return self._losses(policy_chosen_logps, policy_rejected_logps, policy_KL_logps, reference_chosen_logps,
                            reference_rejected_logps, reference_KL_logps)


class CompletionKeysTrainer(_Trainer):
    """TRL 1.6 - 1.7: the collator's keys carry a completion_ prefix; the model is called positionally."""

    KEYS = {"ids": "completion_input_ids", "attention": "completion_attention_mask",
            "kl_ids": "KL_completion_input_ids", "kl_attention": "KL_completion_attention_mask"}

    def _sequence_logps(self, model, ids, attention, completion_mask):
        logits = model(ids, attention_mask=attention).logits
        per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
        per_token = per_token.masked_fill(completion_mask[:, 1:] == 0, 0.0)
        return per_token.sum(-1)


class LogitsTrainer(_Trainer):
    """TRL 1.8 - 1.14: keys input_ids, attention_mask, completion_mask, KL_*; model(**kwargs).logits."""


class FusedHeadTrainer(_Trainer):
    """TRL >= 1.15: model(**kwargs, labels=ids masked to -100 outside the completion, fused_lm_head=True)
    returns per-token log_probs of shape (B, T - 1)."""

    def _sequence_logps(self, model, ids, attention, completion_mask):
        labels = ids.masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=ids, attention_mask=attention, use_cache=False, labels=labels, fused_lm_head=True)
        return outputs.log_probs[:, -(ids.size(1) - 1):].sum(-1)


GROUPS = {"kto_loss (TRL 0.19-1.5)": KtoLossTrainer, "completion keys (TRL 1.6-1.7)": CompletionKeysTrainer,
          "logits (TRL 1.8-1.14)": LogitsTrainer, "fused head (TRL >= 1.15)": FusedHeadTrainer}


def beta_twice(trainer_class):
    """The same trainer with beta applied twice (a known mistake: the oracle names it beta_twice)."""

    class BetaTwice(trainer_class):
        @property
        def beta(self):
            return self._beta_given ** 2

        @beta.setter
        def beta(self, value):
            self._beta_given = value

    BetaTwice.__name__ = f"BetaTwice{trainer_class.__name__}"
    return BetaTwice


class ExtraKeyTrainer(LogitsTrainer):
    """A collator whose batch carries a tensor the loss-level stand-in does not fill."""

    EXTRA_KEYS = ("token_type_ids",)


class PrefixTokenTrainer(LogitsTrainer):
    """Prepends a virtual token before calling the model (as prompt-learning PEFT does): the stand-in model sees
    rows it did not build and cannot answer."""

    def _sequence_logps(self, model, ids, attention, completion_mask):
        ids = torch.cat((torch.zeros_like(ids[:, :1]), ids), 1)
        return super()._sequence_logps(model, ids, torch.ones_like(ids), torch.cat(
            (torch.zeros_like(completion_mask[:, :1]), completion_mask), 1))


class WrongKeysTrainer(LogitsTrainer):
    """Its collator makes TRL 1.8's keys while its loss reads TRL 1.6's: it raises on every case (KeyError)."""

    def _compute_loss(self, model, inputs, return_outputs):
        return inputs["completion_input_ids"].sum()


class NoLossTrainer:
    """A KTOTrainer with neither kto_loss nor _compute_loss."""
