"""Results from any language (`oracle compare`), the results schema, kto_np.testing.assert_kto_matches and
make_kto_case: our own numbers written to JSON pass; a mutated file fails and the case is named."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from kto_np import oracle
from kto_np.oracle.compare import results as results_module
from kto_np.testing import assert_kto_matches

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "oracle-results.schema.json"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results") / "cases"
    oracle.export(folder)
    return folder


@pytest.fixture(scope="module")
def kto_document():
    return oracle.results_document(oracle.builtin_candidate("kto_loss", "kto"), "kto_loss", "kto")


def compare(capsys, cases, path, **kwargs):
    status = oracle.main_compare(cases, path, **kwargs)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("kind,variant", [("kto_loss", "kto"), ("kto_loss", "edifice"), ("dpo_loss", None),
                                          ("sequence_logprobs", None), ("model_kto", "kto")])
def test_our_own_results_round_trip(exported, tmp_path, capsys, kind, variant):
    document = oracle.results_document(oracle.builtin_candidate(kind, variant), kind, variant)
    path = oracle.write_results(tmp_path / "results.json", document)
    status, out, _ = compare(capsys, exported, path)
    assert status == 0, out
    assert "PASSED" in out and "verified identical" in out


def test_a_mutated_number_fails_and_the_case_is_named(exported, kto_document, tmp_path, capsys):
    document = copy.deepcopy(kto_document)
    document["results"]["kto_loss/kto/kl_pairs"]["grad"]["policy_logps"][3] *= 1.001
    path = oracle.write_results(tmp_path / "mutated.json", document)
    status, out, _ = compare(capsys, exported, path)
    assert status == 1
    failing = [line.split()[:2] for line in out.splitlines() if line.endswith("FAIL")]
    assert failing == [["kto_loss/kto/kl_pairs", "grad/policy_logps"]]
    assert "first mismatch at [3]" in out


def test_numbers_of_a_known_mistake_get_the_same_diagnosis_as_check(exported, tmp_path, capsys):
    good = oracle.builtin_candidate("kto_loss", "kto")

    def beta_twice(**kwargs):
        return good(**{**kwargs, "beta": kwargs["beta"] ** 2})

    document = oracle.results_document(beta_twice, "kto_loss", "kto")
    status, out, _ = compare(capsys, exported, oracle.write_results(tmp_path / "r.json", document))
    assert status == 1 and "matches known mistake beta_twice" in out


def test_missing_cases_and_unknown_names_are_reported(exported, kto_document, tmp_path, capsys):
    document = copy.deepcopy(kto_document)
    entry = document["results"].pop("kto_loss/kto/batch_of_1")
    document["results"]["kto_loss/kto/no_such_case"] = entry
    status, out, _ = compare(capsys, exported, oracle.write_results(tmp_path / "r.json", document))
    assert status == 1
    assert "kto_loss/kto/batch_of_1: ERROR, the candidate has no entry in" in out
    assert "'kto_loss/kto/no_such_case' not compared" in out


def test_loss_only_results_and_nulls(exported, kto_document, tmp_path, capsys):
    document = copy.deepcopy(kto_document)
    for name, entry in document["results"].items():
        document["results"][name] = {"loss": entry["loss"], "metrics": {"rewards/chosen": entry["metrics"][
            "rewards/chosen"]}}
    assert document["results"]["kto_loss/kto/undesirable_only"]["metrics"]["rewards/chosen"] is None
    status, out, _ = compare(capsys, exported, oracle.write_results(tmp_path / "r.json", document))
    assert status == 0, out
    assert "not verified:" in out  # no gradient given: the gradient-only mistakes are not verified


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other"), "'format' must be 'kto_np-oracle-results'"),
    (lambda d: d.update(version=2), "'version' must be 1"),
    (lambda d: d.pop("variant"), "lacks ['variant']"),
    (lambda d: d.update(extra=1), "unknown keys ['extra']"),
    (lambda d: d["results"]["kto_loss/kto/kl_pairs"].pop("loss"), "lacks 'loss'"),
    (lambda d: d["results"]["kto_loss/kto/kl_pairs"]["grad"].update(policy_logps=[[1.0], [1.0, 2.0]]),
     "rectangular"),
    (lambda d: d["results"]["kto_loss/kto/kl_pairs"].update(loss="0.5"), "must be a number"),
    (lambda d: d.update(kind="model_kto", variant="kto", kl_rotation=0), "'kl_rotation' must be one of"),
])
def test_a_malformed_results_file_is_one_line_and_exit_2(exported, kto_document, tmp_path, capsys, edit, message):
    document = copy.deepcopy(kto_document)
    edit(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    status, out, err = compare(capsys, exported, path)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert message in err


def test_the_schema_file_describes_what_compare_reads():
    schema = json.loads(SCHEMA.read_text())
    assert set(schema["properties"]) == results_module.TOP_LEVEL_KEYS
    assert set(schema["required"]) == results_module.REQUIRED_KEYS
    assert schema["properties"]["format"]["const"] == oracle.RESULTS_FORMAT
    assert schema["properties"]["version"]["const"] == oracle.RESULTS_VERSION
    assert tuple(schema["properties"]["kind"]["enum"]) == oracle.KINDS
    assert set(schema["properties"]["variant"]["enum"]) == {v for vs in oracle.VARIANTS.values() for v in vs}
    assert set(schema["properties"]["kl_rotation"]["enum"]) == set(oracle.KL_ROTATIONS)
    assert set(schema["$defs"]["case"]["properties"]) == results_module.RESULT_KEYS


def test_assert_kto_matches_passes_and_raises_with_the_report():
    report = assert_kto_matches(oracle.builtin_candidate("kto_loss", "kto"))
    assert report.passed
    assert_kto_matches(oracle.builtin_candidate("dpo_loss"), kind="dpo_loss")  # the default variant is moot
    good = oracle.builtin_candidate("kto_loss", "kto")

    def undesirable_sign(**kwargs):
        loss, grads, metrics = good(**kwargs)
        return loss * 1.01, grads

    with pytest.raises(AssertionError, match="does not match kto_np's reference") as info:
        assert_kto_matches(undesirable_sign)
    assert "FAILED" in str(info.value) and "diagnosis:" in str(info.value)
    with pytest.raises(oracle.LoadError, match="no_such_module_xyz"):
        assert_kto_matches("no_such_module_xyz:f")


def test_make_kto_case_builds_a_checkable_case():
    rng = np.random.default_rng(0)
    policy, ref = -10 + rng.standard_normal(6), -10 + rng.standard_normal(6)
    labels = [1, 0, 1, 1, 0, 0]
    case = oracle.make_kto_case(policy, ref, labels, beta=0.2, desirable_weight=1.3, undesirable_weight=0.9,
                                kl_policy_logps=policy - 0.1, kl_ref_logps=ref - 0.3, name="mine")
    assert case.name == "kto_loss/kto/mine" and case.inputs["labels"].dtype == bool
    from kto_np.losses import kto_loss

    assert case.expected["loss"] == kto_loss(policy, ref, labels, 0.2, 1.3, 0.9, variant="kto",
                                             kl_policy_logps=policy - 0.1, kl_ref_logps=ref - 0.3,
                                             warn_balance=False)
    assert oracle.verify(oracle.builtin_candidate("kto_loss", "kto"), cases=[case]).passed
    for variant in ("edifice", "edifice_stop_z_grad", "apo_zero_unpaired"):
        edifice = oracle.make_kto_case(policy, ref, labels, beta=0.2, variant=variant)
        assert oracle.verify(oracle.builtin_candidate("kto_loss", variant), variant=variant, cases=[edifice]).passed
    with pytest.raises(TypeError, match="beta"):
        oracle.make_kto_case(policy, ref, labels, beta="0.1")
    with pytest.raises(ValueError, match="labels"):
        oracle.make_kto_case(policy, ref, labels[:3], beta=0.1)
    with pytest.raises(ValueError, match="both or neither"):
        oracle.make_kto_case(policy, ref, labels, beta=0.1, kl_policy_logps=policy)
    with pytest.raises(ValueError, match="variant 'kto' only"):
        oracle.make_kto_case(policy, ref, labels, beta=0.1, variant="edifice", kl_policy_logps=policy,
                             kl_ref_logps=ref)


def test_cli_compare_and_kl_rotation(exported, tmp_path, capsys):
    from kto_np.cli import main

    document = oracle.results_document(oracle.builtin_candidate("model_kto", kl_rotation=1), "model_kto",
                                       kl_rotation=1)
    path = oracle.write_results(tmp_path / "plus1.json", document)
    assert main(["oracle", "compare", str(exported), str(path)]) == 0
    assert "kl_rotation=+1" in capsys.readouterr().out
    source = tmp_path / "plus_one_model.py"
    source.write_text("from kto_np import oracle\nmodel = oracle.builtin_candidate('model_kto', kl_rotation=1)\n")
    assert main(["oracle", "check", f"{source}:model", "--kind", "model_kto", "--kl-rotation", "+1"]) == 0
    assert main(["oracle", "check", f"{source}:model", "--kind", "model_kto"]) == 1
    assert "kl_pairs_rotated_wrong_way" in capsys.readouterr().out
