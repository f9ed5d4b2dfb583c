"""The mistakes found in real KTO code: each, written here as a stand-in candidate that makes exactly that
mistake, is caught and named; right candidates pass; every two mistakes of a kind give different numbers.
Also the kl_pairs and accumulation kinds (in-process; data_parallel is in test_oracle_distributed.py)."""

import itertools
import json
import random

import numpy as np
import pytest

from kto_np import oracle
from kto_np.oracle.cases import distributed, kl_pairs
from kto_np.oracle.cases.mistakes import REAL_CODE_MISTAKE_IDS, mutants
from kto_np.oracle.cases.reference import _case, kto_pair_candidate
from kto_np.oracle.compare.report import TOLERANCES, _agrees_or_absent, quantity_class
from kto_np.oracle.run.candidates import edifice_candidate


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch not installed (pip install 'kto_np[torch]')")


def assert_passed(report):
    assert report.passed, f"expected every check to pass:\n{report}"


def assert_diagnosed(report, mistake):
    assert not report.passed, f"stand-in for {mistake!r} passed the oracle:\n{report}"
    assert report.diagnosis.mistakes == (mistake,), f"{mistake!r} diagnosed as {report.diagnosis.mistakes}:\n{report}"


# ---------------------------------------------------------------------------------------------------
# formula-level stand-ins (torch: autograd gives the gradients, so gradient paths through z count)


def torch_kto_loss(variant, mistake=None):
    torch = torch_or_skip()

    def candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                  kl_policy_logps=None, kl_ref_logps=None):
        r = policy_logps - ref_logps
        w = torch.where(labels, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
        if variant.startswith("edifice"):
            kl = beta * r
            z = kl.mean()
            if variant == "edifice_stop_z_grad":
                z = z.detach()
            losses = torch.where(labels, -desirable_weight * torch.sigmoid(kl - z),
                                 -undesirable_weight * torch.sigmoid(-(kl - z)))
        elif variant == "apo_zero_unpaired":
            losses = w * torch.where(labels, 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r))
        else:
            if mistake == "z_from_other_class":  # the kto_pair form: each class's z from the other class
                chosen_kl, rejected_kl = r[labels].mean().clamp(min=0), r[~labels].mean().clamp(min=0)
                desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - rejected_kl)))
                undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (chosen_kl - r)))
                return torch.where(labels, desirable, undesirable).mean()
            if mistake == "z_from_matched_pairs":
                z = r.mean().clamp(min=0).detach()
            elif kl_policy_logps is None:
                z = torch.zeros((), dtype=r.dtype)
            else:
                z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
            losses = w * torch.where(labels, 1 - torch.sigmoid(beta * (r - z)), 1 - torch.sigmoid(beta * (z - r)))
        if mistake == "loss_summed":
            return losses.sum()
        if mistake == "class_means_added":
            total = torch.zeros((), dtype=r.dtype)
            for mask in (labels, ~labels):
                if mask.any():
                    total = total + losses[mask].mean()
            return total
        if mistake in ("single_class_nan", "single_class_crash"):  # TRL #1386: an empty class filled with NaN
            parts = []
            for mask in (labels, ~labels):
                if not mask.any() and mistake == "single_class_crash":
                    raise IndexError("index 0 is out of bounds for dimension 0 with size 0")
                parts.append(losses[mask] if mask.any() else torch.full((1,), float("nan"), dtype=r.dtype))
            return torch.cat(parts).mean()
        return losses.mean()

    return candidate


def metrics_mistake(variant, mistake):
    ours = kto_pair_candidate if variant == "kto_pair" else oracle.builtin_candidate("kto_loss", variant)

    def candidate(**kwargs):
        loss, grads, metrics = ours(**kwargs)
        metrics = dict(metrics)
        if mistake == "logps_metrics_swapped":
            metrics["logps/chosen"], metrics["logps/rejected"] = metrics["logps/rejected"], metrics["logps/chosen"]
        else:  # OpenRLHF: a class's reward is its mean, or 0 when the class is absent
            chosen = metrics["rewards/chosen"] or 0.0
            rejected = metrics["rewards/rejected"] or 0.0
            metrics.update({"rewards/chosen": chosen, "rewards/rejected": rejected,
                            "rewards/margins": chosen - rejected})
        return loss, grads, metrics

    return candidate


def torch_model_prompt_in_mask():
    torch = torch_or_skip()
    from test_oracle import torch_token_logps

    from kto_np import torch_reference  # the independent GPT-2 written in torch

    loss = torch_kto_loss("kto")

    def candidate(state_dict, config, prompt_tokens, completion_tokens, completion_mask, labels, ref_logps,
                  kl_ref_logps, beta, desirable_weight, undesirable_weight):
        def logps(completions, masks):
            tokens = torch.cat([prompt_tokens, completions], dim=1)
            mask = torch.cat([torch.ones(prompt_tokens.shape, dtype=masks.dtype), masks], dim=1)  # the mistake
            params = {name.removeprefix("transformer."): value for name, value in state_dict.items()}
            logits = torch_reference.gpt2_logits(params, tokens, num_heads=config["n_head"], tie_embeddings=False,
                                                 layer_norm_eps=config["layer_norm_epsilon"])
            return torch_token_logps(torch, logits, tokens, mask, 1)

        return loss(logps(completion_tokens, completion_mask), ref_logps, labels, beta, desirable_weight,
                    undesirable_weight, kl_policy_logps=logps(torch.roll(completion_tokens, 1, 0),
                                                              torch.roll(completion_mask, 1, 0)),
                    kl_ref_logps=kl_ref_logps)

    return candidate


FORMULA_STAND_INS = (
    [("kto_loss", v, m) for v in oracle.VARIANTS["kto_loss"] if v != "kto_pair"
     for m in ("class_means_added", "loss_summed")]
    + [("kto_loss", "kto", m) for m in ("z_from_matched_pairs", "z_from_other_class")]
    + [("kto_loss", v, f) for v in ("kto", "apo_zero_unpaired") for f in ("single_class_nan", "single_class_crash")]
    + [("kto_loss", v, m) for v in oracle.VARIANTS["kto_loss"] if v != "kto_pair"
       for m in ("logps_metrics_swapped", "reward_metrics_zero_for_absent")]
    + [("kto_loss", "kto_pair", "logps_metrics_swapped")]
    + [("model_kto", "kto", "prompt_in_mask")]
)
FORMS = {"single_class_crash": "single_class_nan"}


def stand_in(kind, variant, form):
    if form in ("logps_metrics_swapped", "reward_metrics_zero_for_absent"):
        return metrics_mistake(variant, form)
    if kind == "model_kto":
        return torch_model_prompt_in_mask()
    return torch_kto_loss(variant, form)


@pytest.mark.parametrize("kind,variant,form", FORMULA_STAND_INS)
def test_formula_mistake_is_caught_and_named(kind, variant, form):
    report = oracle.verify(stand_in(kind, variant, form), kind, variant)
    assert_diagnosed(report, FORMS.get(form, form))


@pytest.mark.parametrize("variant", [v for v in oracle.VARIANTS["kto_loss"] if v != "kto_pair"])
def test_right_stand_in_passes(variant):
    assert_passed(oracle.verify(torch_kto_loss(variant), "kto_loss", variant))


def test_every_real_code_mutant_has_a_stand_in():
    tested = {(k, v, FORMS.get(f, f)) for k, v, f in FORMULA_STAND_INS}
    tested |= {("kl_pairs", v, m) for v, m, _ in KL_PAIR_STAND_INS}
    tested |= {("accumulation", "kto", m) for m in ACCUMULATION_MISTAKES}
    from test_oracle_distributed import DATA_PARALLEL_TESTED

    tested |= DATA_PARALLEL_TESTED
    tested |= {(k, v, m) for k, v, m, _ in NEW_STAND_INS}
    tested.add(("model_edifice", "edifice", "prompt_in_mask"))  # test_oracle_edifice.MUTANT_CANDIDATES
    builtin = {(k, v, m.mistake) for k in oracle.KINDS for v in oracle.VARIANTS[k] for m in mutants(k, v)
               if m.mistake in REAL_CODE_MISTAKE_IDS}
    assert builtin <= tested | DATA_PARALLEL_FORMULA_ONLY, sorted(builtin - tested - DATA_PARALLEL_FORMULA_ONLY)
    assert {m for _, _, m in builtin} == set(REAL_CODE_MISTAKE_IDS)
    for mistake in REAL_CODE_MISTAKE_IDS:
        entry = oracle.MISTAKES[mistake]
        assert entry.title and entry.fix
        assert entry.seen_in or mistake.endswith("_convention"), f"{mistake}: no source"


# the per-rank formula mistakes of data_parallel are the kto_loss ones, tested for accumulation (the same
# engine, shard by shard) in-process; the data-parallel-specific ones run on real ranks
DATA_PARALLEL_FORMULA_ONLY = {("data_parallel", v, m) for v in oracle.VARIANTS["data_parallel"]
                              for m in ("z_not_detached", "z_not_clamped", "undesirable_sign", "beta_twice",
                                        "beta_missing", "weights_normalise_mean", "loss_summed",
                                        "class_means_added")}


def _differs(a, b, outputs, case_list, metrics):
    for case in case_list:
        first, second = outputs[a][case.name], outputs[b][case.name] if b else case.expected
        for quantity in set(first) & set(second):
            if quantity.startswith("metrics/") != metrics:
                continue
            rtol, atol = TOLERANCES["float64"][quantity_class(quantity, "returned")]
            if not _agrees_or_absent(first[quantity], second[quantity], rtol, atol):
                return True
    return False


@pytest.mark.parametrize("kind,variant", [(k, v) for k in oracle.KINDS for v in oracle.VARIANTS[k]])
def test_every_two_mistakes_give_different_numbers(kind, variant):
    """On the built-in cases each mutant differs from the reference and from every other mistake's mutant
    (the random permutation is decided by a rule, not by numbers)."""
    case_list = [c for c in oracle.generate_cases() if c.kind == kind and c.variant == variant]
    numbered = [m for m in mutants(kind, variant) if m.match is None]
    outputs = {m.label: {c.name: m.compute(c) for c in case_list} for m in numbered}
    for m in numbered:
        assert _differs(m.label, None, outputs, case_list, m.metrics), f"{m.label} equals the reference"
    for a, b in itertools.combinations(numbered, 2):
        if a.mistake != b.mistake and a.metrics == b.metrics:
            assert _differs(a.label, b.label, outputs, case_list, a.metrics), f"{a.label} and {b.label} agree"


def test_sources_are_listed_for_the_older_mistakes_seen_in_real_code():
    for mistake in ("z_not_detached", "logps_mean_not_sum", "undesirable_sign", "kl_pairs_not_mismatched"):
        assert oracle.MISTAKES[mistake].seen_in


# ---------------------------------------------------------------------------------------------------
# kl_pairs


def guard(batch_size):
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for mismatched KL pairs, got {batch_size}")


def trl_rotation(batch_size):
    guard(batch_size)
    return (np.arange(batch_size) - 1) % batch_size


def openrlhf_rotation(batch_size):
    guard(batch_size)
    return [(i + 1) % batch_size for i in range(batch_size)]


def torch_rotation(batch_size):
    torch = torch_or_skip()
    guard(batch_size)
    return torch.roll(torch.arange(batch_size), 1)


def blocks_rotation(batch_size, block_size):
    out = []
    for start in range(0, batch_size, block_size):
        size = min(block_size, batch_size - start)
        guard(size)
        out += [start + (i - 1) % size for i in range(size)]
    return out


def reversal(batch_size):
    guard(batch_size)
    return list(range(batch_size))[::-1]


def blocks_reversal(batch_size, block_size):
    out = []
    for start in range(0, batch_size, block_size):
        size = min(block_size, batch_size - start)
        guard(size)
        out += list(range(start, start + size))[::-1]
    return out


def random_sample(batch_size):
    guard(batch_size)
    return random.Random(batch_size).sample(range(batch_size), batch_size)


def blocks_random_sample(batch_size, block_size):
    out = []
    for start in range(0, batch_size, block_size):
        size = min(block_size, batch_size - start)
        guard(size)
        out += [start + j for j in random.Random(batch_size * 100 + start).sample(range(size), size)]
    return out


def unguarded_rotation(batch_size):
    return (np.arange(batch_size) - 1) % batch_size


def blocks_unguarded(batch_size, block_size):
    return [start + (i - 1) % min(block_size, batch_size - start)
            for start in range(0, batch_size, block_size) for i in range(min(block_size, batch_size - start))]


def matched(batch_size):
    return np.arange(batch_size)


def across_blocks(batch_size, block_size):
    guard(batch_size)
    return (np.arange(batch_size) - 1) % batch_size  # one rotation over the whole global batch


KL_PAIR_STAND_INS = [
    ("whole_batch", "kl_pairs_reversed", reversal), ("blocks", "kl_pairs_reversed", blocks_reversal),
    ("whole_batch", "kl_pairs_random_permutation", random_sample),
    ("blocks", "kl_pairs_random_permutation", blocks_random_sample),
    ("whole_batch", "kl_pairs_single_block_matched", unguarded_rotation),
    ("blocks", "kl_pairs_single_block_matched", blocks_unguarded),
    ("whole_batch", "kl_pairs_not_mismatched", matched),
    ("blocks", "kl_pairs_not_mismatched", lambda batch_size, block_size: np.arange(batch_size)),
    ("blocks", "kl_pairs_across_blocks", across_blocks),
]


@pytest.mark.parametrize("variant,mistake,candidate", KL_PAIR_STAND_INS, ids=[f"{v}-{m}" for v, m, _ in
                                                                               KL_PAIR_STAND_INS])
def test_kl_pair_mistake_is_caught_and_named(variant, mistake, candidate):
    assert_diagnosed(oracle.verify(candidate, "kl_pairs", variant), mistake)


@pytest.mark.parametrize("candidate", [trl_rotation, openrlhf_rotation, torch_rotation,
                                       lambda batch_size, block_size: blocks_rotation(batch_size, batch_size)])
def test_right_kl_pairings_pass(candidate):
    if candidate is torch_rotation:
        torch_or_skip()  # inside the candidate, the skip would be caught by the oracle and reported as an error
    report = oracle.verify(candidate, "kl_pairs")
    assert_passed(report)
    assert {c.quantity for c in report.checks} == set(kl_pairs.QUANTITIES)


def test_right_block_pairing_passes():
    assert_passed(oracle.verify(blocks_rotation, "kl_pairs", "blocks"))


def test_kl_pairs_reference_is_an_error_for_batch_size_1_only():
    whole = next(c for c in oracle.generate_cases() if c.kind == "kl_pairs" and c.variant == "whole_batch")
    assert list(whole.inputs["batch_sizes"]) == list(range(1, 65))
    assert whole.expected["pairs/raised"][0] == 1 and not whole.expected["pairs/raised"][1:].any()
    report = oracle.verify(unguarded_rotation, "kl_pairs")
    failing = [c for c in report.failures]
    assert [(c.quantity, c.mismatch_index) for c in failing] == [("pairs/raised", (0,)), ("pairs/matched", (0,))]


def test_kl_pairs_candidate_raising_everywhere_is_named_in_the_notes():
    def broken(batch_size):
        raise RuntimeError("no pairing today")

    report = oracle.verify(broken, "kl_pairs")
    assert not report.passed
    assert any("no pairing today" in note for note in report.notes), report


def test_kl_pairs_blocks_variant_needs_a_block_size_parameter():
    report = oracle.verify(trl_rotation, "kl_pairs", "blocks")
    assert not report.passed and "block_size" in next(iter(report.errors.values()))


# ---------------------------------------------------------------------------------------------------
# accumulation


def torch_accumulation(mistake=None):
    torch = torch_or_skip()

    def candidate(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                  undesirable_weight, *, micro_step, accumulation_steps):
        r = policy_logps - ref_logps
        z = (kl_policy_logps - kl_ref_logps).mean()
        if mistake != "z_not_clamped":
            z = z.clamp(min=0)
        if mistake != "z_not_detached":
            z = z.detach()
        b = {"beta_twice": beta * beta, "beta_missing": 1.0}.get(mistake, beta)
        w = torch.where(labels, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
        undesirable_arg = -b * r - b * z if mistake == "undesirable_sign" else b * (z - r)
        losses = w * torch.where(labels, 1 - torch.sigmoid(b * (r - z)), 1 - torch.sigmoid(undesirable_arg))
        if mistake == "weights_normalise_mean":
            loss = losses.sum() / w.sum()
        elif mistake == "loss_summed":
            loss = losses.sum()
        elif mistake == "class_means_added":
            loss = sum(losses[m].mean() for m in (labels, ~labels) if m.any())
        else:
            loss = losses.mean()
        return loss if mistake == "accumulation_not_divided" else loss / accumulation_steps

    return candidate


def numpy_accumulation(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                       undesirable_weight, *, micro_step, accumulation_steps):
    z = max(0.0, float(np.mean(kl_policy_logps - kl_ref_logps)))
    r = policy_logps - ref_logps
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    losses = np.where(labels, desirable_weight * (1 - sigmoid(beta * (r - z))),
                      undesirable_weight * (1 - sigmoid(beta * (z - r))))
    return losses.mean() / accumulation_steps


ACCUMULATION_MISTAKES = ("accumulation_not_divided", "z_not_detached", "z_not_clamped", "undesirable_sign",
                         "beta_twice", "beta_missing", "weights_normalise_mean", "loss_summed", "class_means_added")


@pytest.mark.parametrize("mistake", ACCUMULATION_MISTAKES)
def test_accumulation_mistake_is_caught_and_named(mistake):
    assert_diagnosed(oracle.verify(torch_accumulation(mistake), "accumulation"), mistake)


def test_right_accumulation_candidates_pass():
    report = oracle.verify(torch_accumulation(), "accumulation")
    assert_passed(report)
    assert {c.source for c in report.checks if c.quantity.startswith("grad/")} == {"autograd"}
    report = oracle.verify(numpy_accumulation, "accumulation")
    assert_passed(report)
    assert {c.source for c in report.checks if c.quantity == "grad/policy_logps"} == {"finite differences"}
    assert_passed(oracle.verify(distributed.builtin_accumulation, "accumulation"))


def test_accumulation_reference_is_the_mean_of_micro_batch_losses_by_the_core():
    """Independent of distributed.py's shard engine: losses.kto_loss_and_grad on each micro-batch, / A."""
    for case in (c for c in oracle.generate_cases() if c.kind == "accumulation"):
        sizes = list(case.inputs["micro_batch_sizes"])
        bounds = np.cumsum([0] + sizes)
        total, grads = 0.0, []
        for a, b in zip(bounds[:-1], bounds[1:]):
            part = {k: case.inputs[k][a:b] for k in ("policy_logps", "ref_logps", "labels", "kl_policy_logps",
                                                     "kl_ref_logps")}
            loss, grad, _ = oracle.builtin_candidate("kto_loss", "kto")(
                **part, beta=float(case.inputs["beta"]), desirable_weight=float(case.inputs["desirable_weight"]),
                undesirable_weight=float(case.inputs["undesirable_weight"]))
            total += loss / len(sizes)
            grads.append(grad["policy_logps"] / len(sizes))
        assert float(case.expected["loss"]) == pytest.approx(total, rel=1e-13)
        np.testing.assert_allclose(case.expected["grad/policy_logps"], np.concatenate(grads), rtol=1e-12)


def test_shard_engine_without_mistakes_is_the_reference():
    for case in (c for c in oracle.generate_cases() if c.kind in ("data_parallel", "accumulation")):
        outputs = distributed.mutant_outputs(case, distributed.Setting())
        for quantity, value in outputs.items():
            np.testing.assert_allclose(value, case.expected[quantity], rtol=1e-12, atol=1e-15,
                                       err_msg=f"{case.name} {quantity}")


@pytest.mark.parametrize("kind,variant", [("kl_pairs", "whole_batch"), ("kl_pairs", "blocks"),
                                          ("accumulation", "kto")])
def test_builtin_pipeline_candidates_pass(kind, variant):
    assert_passed(oracle.verify(oracle.builtin_candidate(kind, variant), kind, variant))


# ---------------------------------------------------------------------------------------------------
# the pipeline kinds through results files (compare) and kto_np.testing


@pytest.mark.parametrize("kind,variant", [("kl_pairs", "whole_batch"), ("kl_pairs", "blocks"),
                                          ("accumulation", "kto"), ("data_parallel", "rank_means"),
                                          ("data_parallel", "global_mean")])
def test_pipeline_results_round_trip_and_a_mutated_file_is_named(kind, variant, tmp_path):
    from kto_np.oracle.compare import results

    document = results.results_document(oracle.builtin_candidate(kind, variant), kind, variant)
    path = results.write_results(tmp_path / "results.json", document)
    assert_passed(results.compare_results(None, path))
    mutated = json.loads(path.read_text())
    for entry in mutated["results"].values():
        if kind == "kl_pairs":  # completion[::-1] within each block, where a pairing exists
            for key, value in entry["indices"].items():
                batch_size, _, block_size = key.partition("/")
                block_size = int(block_size or batch_size)
                entry["indices"][key] = None if value is None else [
                    start + j for start in range(0, int(batch_size), block_size)
                    for j in reversed(range(min(block_size, int(batch_size) - start)))]
        else:  # every part x the number of parts: not divided by A, or summed over ranks
            parts = entry["ranks" if kind == "data_parallel" else "micro_steps"]
            for part in parts:
                part["loss"] *= len(parts)
                part["grad"] = {k: [g * len(parts) for g in v] for k, v in part["grad"].items()}
    expected = {"kl_pairs": "kl_pairs_reversed", "accumulation": "accumulation_not_divided",
                "data_parallel": "dp_losses_summed"}[kind]
    assert_diagnosed(results.compare_results(None, mutated), expected)


def test_a_pipeline_results_entry_that_does_not_fit_is_refused():
    from kto_np.oracle.compare import results

    document = results.results_document(distributed.builtin_accumulation, "accumulation")
    name = next(iter(document["results"]))
    document["results"][name]["micro_steps"].pop()
    with pytest.raises(results.ResultsError, match="micro_steps.*must be a list of"):
        results.compare_results(None, document)
    document["results"][name] = {"loss": 1.0}
    with pytest.raises(results.ResultsError, match="exactly the key 'micro_steps'"):
        results.compare_results(None, document)


def test_assert_kto_matches_for_the_pipeline_kinds():
    from kto_np.testing import assert_kto_matches

    assert assert_kto_matches(trl_rotation, kind="kl_pairs").passed
    assert assert_kto_matches(blocks_rotation, kind="kl_pairs", variant="blocks").passed
    assert assert_kto_matches(numpy_accumulation, kind="accumulation").passed
    with pytest.raises(AssertionError, match="kl_pairs_reversed"):
        assert_kto_matches(reversal, kind="kl_pairs")


# ---------------------------------------------------------------------------------------------------
# the mistakes found since (docs/oracle/mistakes.md): NumPy stand-ins, each written as the project's code
# does it, built on kto_np's own loss (losses.kto_loss_and_grad) or its own model candidate


def numpy_reference_mistake(kind, variant, form):
    """reference_missing (r = log pi: the reference log-probs taken as 0) or reference_is_policy (the policy's
    log-probs used as the reference's: r = 0), kto_np's own code otherwise."""
    if kind == "model_edifice":
        ours = edifice_candidate

        def candidate(params, config, tokens, targets, mask, labels, ref_logps, beta, desirable_weight,
                      undesirable_weight):
            keywords = dict(params=params, config=config, tokens=tokens, targets=targets, mask=mask, labels=labels,
                            beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
            if form == "reference_missing":
                return ours(ref_logps=np.zeros_like(ref_logps), **keywords)
            return ours(ref_logps=ours(ref_logps=ref_logps, **keywords)["logps"], **keywords)

        return candidate
    ours = oracle.builtin_candidate(kind, variant)
    if kind == "model_kto":
        def candidate(state_dict, config, **inputs):
            if form == "reference_missing":
                return ours(state_dict, config, **{**inputs, "ref_logps": np.zeros_like(inputs["ref_logps"])})
            first = ours(state_dict, config, **inputs)  # the policy's own log-probs, then used as the reference's
            return ours(state_dict, config, **{**inputs, "ref_logps": first["policy_logps"],
                                               "kl_ref_logps": first["kl_policy_logps"]})

        return candidate

    def loss_candidate(**inputs):
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if form == "reference_missing":
            inputs["ref_logps"] = np.zeros_like(inputs["ref_logps"])
        else:
            inputs["ref_logps"] = inputs["policy_logps"].copy()
            if "kl_policy_logps" in inputs:
                inputs["kl_ref_logps"] = inputs["kl_policy_logps"].copy()
        return ours(**inputs)

    return loss_candidate


def _subtracted_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                     kl_policy_logps=None, kl_ref_logps=None, *, scale="mean"):
    """align-anything's loss: the desirable terms minus the undesirable ones, from the core's per-class losses
    (same z: the same KL pairs); scale "mean" (over all n) or "class_means" (mean_D - mean_U)."""
    from kto_np.losses import kto_loss_and_grad

    labels = np.asarray(labels, dtype=bool)
    n = labels.shape[0]
    loss, grad = 0.0, np.zeros(n)
    for members, sign in ((labels, 1.0), (~labels, -1.0)):
        if not members.any():
            continue
        part, part_grad, _ = kto_loss_and_grad(policy_logps[members], ref_logps[members], labels[members], beta,
                                               desirable_weight, undesirable_weight, variant="kto",
                                               kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps,
                                               warn_balance=False)
        share = 1.0 if scale == "class_means" else members.sum() / n
        loss += sign * share * part
        grad[members] = sign * share * part_grad
    return loss, grad


def numpy_undesirable_subtracted(scale="mean"):
    def candidate(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight, kl_policy_logps=None,
                  kl_ref_logps=None):
        loss, grad = _subtracted_loss(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                      kl_policy_logps, kl_ref_logps, scale=scale)
        grads = {"policy_logps": grad}
        if kl_policy_logps is not None:
            grads["kl_policy_logps"] = np.zeros_like(kl_policy_logps)
        return loss, grads

    return candidate


def numpy_model_undesirable_subtracted():
    """kto_np's GPT-2 (forward, hand-written backward) with align-anything's loss on its log-probs."""
    from kto_np.logprobs import sequence_logprobs_backward, sequence_logprobs_forward
    from kto_np.oracle.cases.reference import Case, hf_name, model_case_batch, model_from_case, trainable_names

    def candidate(state_dict, config, prompt_tokens, completion_tokens, completion_mask, labels, ref_logps,
                  kl_ref_logps, beta, desirable_weight, undesirable_weight):
        inputs = {**{f"state_dict/{k}": v for k, v in state_dict.items()}, "prompt_tokens": prompt_tokens,
                  "completion_tokens": completion_tokens, "completion_mask": completion_mask, "labels": labels}
        case = Case("candidate", "model_kto", "kto", "", inputs, {}, config)
        model, params = model_from_case(case)
        batch = model_case_batch(case, -1)
        logits, cache = model.forward(params, batch.tokens)
        logps, logps_cache = sequence_logprobs_forward(logits, batch.tokens, batch.completion_mask)
        kl_logps = sequence_logprobs_forward(model.forward(params, batch.kl_tokens)[0], batch.kl_tokens,
                                             batch.kl_completion_mask)[0]
        loss, dlogps = _subtracted_loss(logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                        kl_logps, kl_ref_logps)
        grads = model.backward(sequence_logprobs_backward(dlogps, logps_cache), cache)
        names = set(trainable_names(case))
        return loss, {hf_name(k): g for k, g in grads.items() if hf_name(k) in names}

    return candidate


def numpy_other_class_unweighted(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                                 kl_policy_logps=None, kl_ref_logps=None):
    """OpenRLHF's VanillaKTOLoss / TRL's kto_pair: z of the other class, clamped, and no class weights (loss
    only: finite differences see the gradient through z)."""
    r = policy_logps - ref_logps
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    chosen_kl, rejected_kl = _class_kl(r, labels)
    return np.where(labels, 1 - sigmoid(beta * (r - rejected_kl)), 1 - sigmoid(beta * (chosen_kl - r))).mean()


def _class_kl(r, labels):
    """max(0, mean r) of each class; NaN for an absent class (as torch's mean of an empty tensor)."""
    with np.errstate(invalid="ignore"):
        return (np.maximum(0.0, r[labels].sum() / labels.sum()), np.maximum(0.0, r[~labels].sum() / (~labels).sum()))


def numpy_easydel_window(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                         undesirable_weight, *, micro_step, accumulation_steps, window):
    """EasyDeL with accumulation: the reference's KL completions rolled by one over the whole window, the
    policy's within the micro-batch (the kl_policy_logps given)."""
    n = window["pair_ref_logps"].shape[0]
    rolled = window["pair_ref_logps"][np.arange(n), (np.arange(n) - 1) % n][window["start"]:window["stop"]]
    return distributed.builtin_accumulation(policy_logps, ref_logps, labels, kl_policy_logps, rolled, beta,
                                            desirable_weight, undesirable_weight, micro_step=micro_step,
                                            accumulation_steps=accumulation_steps)


def numpy_window_right(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                       undesirable_weight, *, micro_step, accumulation_steps, window):
    """The same code with its KL pairs built once, within the micro-batch, for both models."""
    start, stop = window["start"], window["stop"]
    local = np.arange(stop - start)
    rows, partners = start + local, start + (local - 1) % (stop - start)
    return distributed.builtin_accumulation(
        policy_logps, ref_logps, labels, window["pair_policy_logps"][rows, partners],
        window["pair_ref_logps"][rows, partners], beta, desirable_weight, undesirable_weight, micro_step=micro_step,
        accumulation_steps=accumulation_steps)


NEW_STAND_INS = (
    [("kto_loss", v, m, numpy_reference_mistake("kto_loss", v, m))
     for v in ("kto", "edifice", "edifice_stop_z_grad", "apo_zero_unpaired")
     for m in ("reference_missing", "reference_is_policy")]
    + [("model_kto", "kto", m, numpy_reference_mistake("model_kto", "kto", m))
       for m in ("reference_missing", "reference_is_policy")]
    + [("model_edifice", "edifice", m, numpy_reference_mistake("model_edifice", "edifice", m))
       for m in ("reference_missing", "reference_is_policy")]
    + [("kto_loss", "kto", "undesirable_subtracted", numpy_undesirable_subtracted()),
       ("model_kto", "kto", "undesirable_subtracted", numpy_model_undesirable_subtracted()),
       ("kto_loss", "kto", "z_from_other_class+weights_ignored", numpy_other_class_unweighted),
       ("accumulation", "kto", "accumulation_kl_pairs_window", numpy_easydel_window)]
)
# the edifice variants' undesirable term: the stand-in above is written for 'kto'; the mutant is there too
for _variant in ("edifice", "edifice_stop_z_grad", "apo_zero_unpaired"):
    NEW_STAND_INS.append(("kto_loss", _variant, "undesirable_subtracted", None))


@pytest.mark.parametrize("kind,variant,mistake,candidate", [s for s in NEW_STAND_INS if s[3] is not None],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_mistakes_found_since_are_caught_and_named(kind, variant, mistake, candidate):
    report = oracle.verify(candidate, kind, variant)
    assert not report.passed, report
    assert report.diagnosis.mistakes == tuple(mistake.split("+")), report


@pytest.mark.parametrize("variant", ["edifice_stop_z_grad", "apo_zero_unpaired"])
def test_undesirable_subtracted_mutant_flips_the_undesirable_gradients(variant):
    """The mutant of the other variants: every undesirable example's gradient has the reference's opposite
    sign, every desirable one the same (where z passes no gradient; with Edifice's attached z the gradient
    through z mixes the classes, and the mutant still differs from the reference and every other mistake:
    test_every_two_mistakes_give_different_numbers)."""
    mutant = next(m for m in mutants("kto_loss", variant) if m.label == "undesirable_subtracted")
    for case in (c for c in oracle.generate_cases() if c.kind == "kto_loss" and c.variant == variant):
        labels = case.inputs["labels"]
        grad, reference = mutant.compute(case)["grad/policy_logps"], case.expected["grad/policy_logps"]
        assert np.all(np.sign(grad[labels]) == np.sign(reference[labels])), case.name
        assert np.all(np.sign(grad[~labels]) == -np.sign(reference[~labels])), case.name


def test_undesirable_subtracted_at_another_scale_is_named_by_the_gradient_signs():
    """align-anything's paired mean is a different scale: no exact mutant, the sign rule names it."""
    report = oracle.verify(numpy_undesirable_subtracted("class_means"), "kto_loss", "kto")
    assert report.diagnosis.mistakes == ("undesirable_subtracted",), report


def test_the_window_aware_right_candidate_passes_and_old_cases_do_not_list_the_window_mistake():
    assert_passed(oracle.verify(numpy_window_right, "accumulation"))
    old = [_case(c.name, c.kind, c.variant, c.formula,
                              {k: v for k, v in c.inputs.items() if not k.startswith("pair_")}, dict(c.expected))
           for c in oracle.generate_cases() if c.kind == "accumulation"]
    report = oracle.verify(distributed.builtin_accumulation, "accumulation", cases=old)
    assert report.passed and "accumulation_kl_pairs_window" not in report.not_verified, report


def test_pair_tables_hold_the_case_s_own_log_probs():
    for case in (c for c in oracle.generate_cases() if c.kind == "accumulation"):
        n = case.inputs["policy_logps"].shape[0]
        rows, partners = np.arange(n), distributed.kl_partners(case.inputs["micro_batch_sizes"])
        for table, matched, kl in (("pair_policy_logps", "policy_logps", "kl_policy_logps"),
                                   ("pair_ref_logps", "ref_logps", "kl_ref_logps")):
            np.testing.assert_array_equal(case.inputs[table][rows, rows], case.inputs[matched])
            np.testing.assert_array_equal(case.inputs[table][rows, partners], case.inputs[kl])
        window = (rows - 1) % n
        assert np.sum(window != partners) == len(case.inputs["micro_batch_sizes"])  # each micro-batch's first


def test_kto_pair_is_a_variant_where_the_attached_other_class_z_is_right():
    """TRL <= 0.9's kto_pair passes its own variant, and is named z_from_other_class under 'kto'."""
    def kto_pair_weighted(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                          kl_policy_logps=None, kl_ref_logps=None):
        r = policy_logps - ref_logps
        sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
        chosen_kl, rejected_kl = _class_kl(r, labels)
        return np.where(labels, desirable_weight * (1 - sigmoid(beta * (r - rejected_kl))),
                        undesirable_weight * (1 - sigmoid(beta * (chosen_kl - r)))).mean()

    assert_passed(oracle.verify(kto_pair_weighted, "kto_loss", "kto_pair"))
    assert oracle.verify(kto_pair_weighted, "kto_loss", "kto").diagnosis.mistakes == ("z_from_other_class",)
    unweighted = oracle.verify(numpy_other_class_unweighted, "kto_loss", "kto_pair")
    assert unweighted.diagnosis.mistakes == ("weights_ignored",), unweighted


def test_new_mistakes_have_their_sources():
    for mistake in ("reference_missing", "reference_is_policy", "undesirable_subtracted",
                    "accumulation_kl_pairs_window"):
        assert oracle.MISTAKES[mistake].seen_in, mistake


# ---------------------------------------------------------------------------------------------------
# names that are right: one class, two causes, a weak resemblance, what could not be shown


def test_nan_only_on_single_class_batches_is_single_class_nan():
    """TRL #1386's symptom as a candidate returns it: a NaN loss where a class is absent, finite gradients."""
    ours = oracle.builtin_candidate("kto_loss", "kto")

    def nan_when_a_class_is_absent(**inputs):
        loss, grads, metrics = ours(**inputs)
        labels = inputs["labels"]
        return (float("nan") if labels.all() or not labels.any() else loss), grads

    report = oracle.verify(nan_when_a_class_is_absent, "kto_loss", "kto")
    assert report.diagnosis.mistakes == ("single_class_nan",), report
    assert "z_from_other_class" not in report.diagnosis.message


def test_nan_on_a_one_class_micro_batch_is_single_class_nan():
    def nan_on_one_class(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                         undesirable_weight, *, micro_step, accumulation_steps):
        loss, grads = distributed.builtin_accumulation(
            policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
            undesirable_weight, micro_step=micro_step, accumulation_steps=accumulation_steps)
        return (float("nan") if labels.all() or not labels.any() else loss), grads

    report = oracle.verify(nan_on_one_class, "accumulation")
    assert report.diagnosis.mistakes == ("single_class_nan",), report


def test_float32_rounding_and_weights_ignored_are_named_together():
    """Liger's KTO at float64: no class weights, and float32 inside."""
    ours = oracle.builtin_candidate("kto_loss", "kto")

    def float32_without_weights(**inputs):
        loss, grads, _ = ours(**{**inputs, "desirable_weight": 1.0, "undesirable_weight": 1.0})
        return (np.float64(np.float32(loss)), {k: v.astype(np.float32).astype(np.float64) for k, v in grads.items()})

    report = oracle.verify(float32_without_weights, "kto_loss", "kto")
    assert report.diagnosis.mistakes == ("weights_ignored",), report
    assert "float32" in report.diagnosis.message and "two causes together" in report.diagnosis.message
    assert oracle.verify(float32_without_weights, "kto_loss", "kto", tolerance="float32").diagnosis.mistakes == (
        "weights_ignored",)


def test_a_weak_resemblance_is_said_to_be_weak():
    """beta_twice on one case, a 1% loss error everywhere else: beta_twice reproduces 2 of the failing checks."""
    ours = oracle.builtin_candidate("kto_loss", "kto")

    def mostly_unknown(**inputs):
        labels = inputs["labels"]
        if labels.shape[0] == 8 and inputs.get("kl_policy_logps") is None:  # the no_kl_pairs case
            return ours(**{**inputs, "beta": inputs["beta"] ** 2})[:2]
        loss, grads, _ = ours(**inputs)
        return loss * 1.01, grads

    report = oracle.verify(mostly_unknown, "kto_loss", "kto")
    assert report.diagnosis.mistakes == ()
    assert "weak resemblance" in report.diagnosis.message and "closest:" not in report.diagnosis.message, report
    assert report.diagnosis.closest == "beta_twice"


def test_metrics_a_candidate_does_not_return_are_not_listed_as_not_verified():
    """TRL's kto_loss returns rewards and the KL, no log-prob metrics: logps_metrics_swapped cannot happen."""
    ours = oracle.builtin_candidate("kto_loss", "kto")

    def without_logps_metrics(**inputs):
        loss, grads, metrics = ours(**inputs)
        return loss, grads, {k: v for k, v in metrics.items() if not k.startswith("logps/")}

    report = oracle.verify(without_logps_metrics, "kto_loss", "kto")
    assert report.passed and "logps_metrics_swapped" not in report.not_verified, report
    assert "not verified" not in str(report)
