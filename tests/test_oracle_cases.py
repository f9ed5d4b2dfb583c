"""Case-file integrity: a case folder is compared with what this kto_np would export; a folder that differs
is said to differ (and is no pass), and an invalid model config is a case error (exit 2), never the
candidate's failure."""

import json
import shutil

import pytest

from kto_np import __version__, oracle
from kto_np.oracle.cases.store import compare_with_installed

UNDESIRABLE_SIGN = '''
import numpy as np
from kto_np import oracle

good = oracle.builtin_candidate("kto_loss", "kto")
good_model = oracle.builtin_candidate("model_kto")

def undesirable_sign(policy_logps, ref_logps, labels, beta, desirable_weight, undesirable_weight,
                     kl_policy_logps=None, kl_ref_logps=None):
    r = policy_logps - ref_logps
    z = 0.0 if kl_policy_logps is None else max(0.0, float(np.mean(kl_policy_logps - kl_ref_logps)))
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    losses = np.where(labels, desirable_weight * (1 - sigmoid(beta * (r - z))),
                      undesirable_weight * (1 - sigmoid(-beta * r - beta * z)))
    return float(losses.mean())
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases") / "cases"
    oracle.export(folder)
    return folder


@pytest.fixture
def candidates(tmp_path):
    path = tmp_path / "integrity_candidates.py"
    path.write_text(UNDESIRABLE_SIGN)
    return path


def edited_copy(exported, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_an_exported_folder_is_verified_identical(exported, candidates, capsys):
    assert oracle.main_check(f"{candidates}:good", "kto_loss", "kto", exported) == 0
    assert f"cases: {exported}: verified identical to kto_np {__version__}'s" in capsys.readouterr().out


def test_removed_manifest_entries_no_longer_let_a_buggy_candidate_pass(exported, candidates, tmp_path, capsys):
    keep = {"kto_loss/kto/no_kl_pairs", "kto_loss/kto/kl_pairs_negative", "kto_loss/kto/desirable_only"}

    def remove(manifest):
        manifest["cases"] = [e for e in manifest["cases"] if e["kind"] != "kto_loss" or e["name"] in keep]

    folder = edited_copy(exported, tmp_path, remove)
    report = oracle.verify(f"{candidates}:undesirable_sign", "kto_loss", "kto", folder)
    assert all(c.passed for c in report.checks)  # the bug does not show on the cases left...
    assert not report.passed  # ...but the verdict is not a pass
    assert report.cases_identical is False
    assert "missing from the manifest: kto_loss/kto/batch_of_1" in report.cases_source
    assert oracle.main_check(f"{candidates}:undesirable_sign", "kto_loss", "kto", folder) == 2
    captured = capsys.readouterr()
    assert "DIFFER from kto_np" in captured.out and "re-export" in captured.err


def test_an_edited_valid_config_is_named_and_not_blamed_on_the_candidate(exported, candidates, tmp_path, capsys):
    def edit(manifest):
        for entry in manifest["cases"]:
            if entry["kind"] == "model_kto":
                entry["config"]["n_head"] = 4  # still a valid GPT-2 config, but not the model of these numbers

    folder = edited_copy(exported, tmp_path, edit)
    identical, line = compare_with_installed(folder)
    assert not identical
    assert "edited: model_kto/kto/kl_negative (config); model_kto/kto/kl_negative_rotation_plus_1 (config)" in line
    assert oracle.main_check(f"{candidates}:good_model", "model_kto", None, folder) == 2
    assert "(config)" in capsys.readouterr().out


@pytest.mark.parametrize("field,value,message", [
    ("n_head", 5, "n_embd 12 is not divisible by n_head 5"),
    ("n_layer", 3, "2 layers; the config says"),
    ("activation_function", "relu", "activation_function must be 'gelu_new'"),
    ("vocab_size", "11", "vocab_size must be a positive integer"),
])
def test_an_invalid_config_is_a_case_error(exported, candidates, tmp_path, capsys, field, value, message):
    def edit(manifest):
        for entry in manifest["cases"]:
            if entry["kind"] == "model_kto":
                entry["config"][field] = value

    folder = edited_copy(exported, tmp_path, edit)
    with pytest.raises(ValueError, match="invalid model config"):
        oracle.load_cases(folder)
    assert oracle.main_check(f"{candidates}:good_model", "model_kto", None, folder) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_loss_moved_to_absent_is_refused(exported, candidates, tmp_path, capsys):
    def edit(manifest):
        for entry in manifest["cases"]:
            if entry["name"] == "kto_loss/kto/kl_pairs":
                entry["absent"].append("loss")

    folder = edited_copy(exported, tmp_path, edit)
    with pytest.raises(ValueError, match="'absent' may list metrics only"):
        oracle.load_cases(folder)
    assert oracle.main_check(f"{candidates}:good", "kto_loss", "kto", folder) == 2


def test_case_objects_and_in_memory_cases_say_where_they_came_from():
    good = oracle.builtin_candidate("dpo_loss")
    assert oracle.verify(good, "dpo_loss").cases_source == f"generated by kto_np {__version__}"
    cases = [c for c in oracle.generate_cases() if c.kind == "dpo_loss"]
    report = oracle.verify(good, "dpo_loss", cases=cases)
    assert report.passed and report.cases_identical is None and "Case objects" in report.cases_source


def _npy_entry(shape, data: bytes) -> bytes:
    """An .npy entry whose header declares `shape` (float64), followed by `data`."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def test_a_crafted_case_file_is_refused_before_its_arrays_are_read(exported, tmp_path):
    import zipfile

    folder = tmp_path / "crafted"
    shutil.copytree(exported, folder)
    entry = json.loads((folder / "manifest.json").read_text())["cases"][0]
    key = next(iter(entry["arrays"]))
    # a header that declares 8 GB of float64 with 8 bytes behind it: refused from the zip directory
    with zipfile.ZipFile(folder / entry["file"], "w") as archive:
        archive.writestr(key + ".npy", _npy_entry((10**9,), b"\0" * 8))
    with pytest.raises(ValueError, match="cannot read the arrays|do not match"):
        oracle.load_cases(folder)
    # an entry the manifest does not declare: named before anything is decompressed
    with zipfile.ZipFile(folder / entry["file"], "w") as archive:
        archive.writestr("inputs/unexpected.npy", _npy_entry((1,), b"\0" * 8))
    with pytest.raises(ValueError, match="unexpected \\['inputs/unexpected'\\]"):
        oracle.load_cases(folder)
