"""The tutorials run, assert what they claim, leave nothing behind, and are valid jupytext notebooks;
the committed executed notebooks (tutorials/*.ipynb) hold exactly their scripts' cells.

Each tutorial runs as a subprocess (`python tutorials/NN_name.py`) in an empty temporary working
directory, with KTO_NP_TUTORIAL_FAST=1 and KTO_NP_TUTORIAL_OUT pointing into pytest's tmp_path, and
with every warning shown (PYTHONWARNINGS=default) and one BLAS thread: it must exit 0 with an
empty stderr, and write only into KTO_NP_TUTORIAL_OUT.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUTORIALS_DIR = REPO / "tutorials"
# The lessons NN_name.py, then the appendices AN_name.py.
TUTORIALS = sorted(TUTORIALS_DIR.glob("[0-9][0-9]_*.py")) + sorted(TUTORIALS_DIR.glob("A[0-9]_*.py"))
EXPECTED = [
    "01_kto_loss_by_hand.py",
    "02_loss_surfaces.py",
    "03_sequence_logprobs.py",
    "04_backprop_through_the_transformer.py",
    "05_training_with_binary_feedback.py",
    "06_imbalanced_feedback.py",
    "07_edifice_backbone.py",
    "08_the_seed_formula_in_training.py",
    "09_when_z_ref_is_positive.py",
    "10_kto_vs_dpo.py",
    "11_beta_in_training.py",
    "A1_verify_a_pytorch_kto.py",
]
# The tutorials whose settings depend on KTO_NP_TUTORIAL_FAST: their full settings run as slow tests.
SIZE_DEPENDENT = ["02_loss_surfaces.py", "05_training_with_binary_feedback.py"]
# The lessons that train several runs: their full settings (15-30 s each) run when KTO_NP_TUTORIAL_FULL=1.
# tutorials/build_notebooks.py always runs them in full, and the committed notebooks hold that run.
TRAINING_LESSONS = ["06_imbalanced_feedback.py", "08_the_seed_formula_in_training.py", "09_when_z_ref_is_positive.py",
                    "10_kto_vs_dpo.py", "11_beta_in_training.py"]
# What each tutorial writes into KTO_NP_TUTORIAL_OUT (and nothing else anywhere).
OUTPUTS = {
    "02_loss_surfaces.py": ["02_class_balance.png", "02_kto_vs_dpo.png", "02_loss_surface_beta.png",
                            "02_loss_surface_kto.png", "02_value_functions.png", "02_z_gradient.png"],
    "05_training_with_binary_feedback.py": ["05_training_curves.png", "run"],
    "06_imbalanced_feedback.py": ["06_class_balance.png", "band_weights", "equal_weights", "reference"],
    "08_the_seed_formula_in_training.py": ["edifice", "edifice_stop_z", "kto", "reference"],
    "09_when_z_ref_is_positive.py": ["balanced", "desirable_only", "reference"],
    "10_kto_vs_dpo.py": ["reference"],
    "11_beta_in_training.py": ["beta_0.01", "beta_0.1", "beta_1", "reference"],
    "A1_verify_a_pytorch_kto.py": ["oracle_cases"],
}
TIMEOUT_S = 300


def _run(tutorial: Path, tmp_path: Path, *, fast: bool) -> subprocess.CompletedProcess:
    workdir = tmp_path / "cwd"
    out = tmp_path / "out"
    workdir.mkdir()
    env = dict(os.environ)
    env.update(
        KTO_NP_TUTORIAL_OUT=str(out),
        PYTHONWARNINGS="default",
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    # Tiny matrices gain nothing from BLAS threads, and on a busy 2-core machine OpenBLAS threads
    # spinning against other processes made tutorial 04 seven times slower (21 s instead of 3 s).
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    if fast:
        env["KTO_NP_TUTORIAL_FAST"] = "1"
    else:
        env.pop("KTO_NP_TUTORIAL_FAST", None)
    before = sorted(p.name for p in TUTORIALS_DIR.iterdir())
    result = subprocess.run([sys.executable, str(tutorial)], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (
        f"{tutorial.name} exited with {result.returncode}\n--- stdout (tail) ---\n{result.stdout[-3000:]}"
        f"\n--- stderr ---\n{result.stderr[-5000:]}")
    assert result.stderr.strip() == "", f"{tutorial.name} wrote to stderr (a warning?):\n{result.stderr[-5000:]}"
    assert list(workdir.iterdir()) == [], f"{tutorial.name} left files in its working directory"
    assert sorted(p.name for p in TUTORIALS_DIR.iterdir()) == before, f"{tutorial.name} wrote into tutorials/"
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written == OUTPUTS.get(tutorial.name, []), f"{tutorial.name} wrote {written} into KTO_NP_TUTORIAL_OUT"
    for name in written:
        if name.endswith(".png"):
            assert (out / name).read_bytes().startswith(b"\x89PNG"), f"{name} is not a PNG"
    return result


def test_every_tutorial_is_present():
    assert [p.name for p in TUTORIALS] == EXPECTED


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(tutorial, tmp_path):
    _run(tutorial, tmp_path, fast=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", SIZE_DEPENDENT)
def test_tutorial_runs_full_size(name, tmp_path):
    _run(TUTORIALS_DIR / name, tmp_path, fast=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_LESSONS)
def test_training_lesson_runs_full_size(name, tmp_path):
    if os.environ.get("KTO_NP_TUTORIAL_FULL") != "1":
        pytest.skip("the full-size training lessons run with KTO_NP_TUTORIAL_FULL=1 (and in build_notebooks.py)")
    _run(TUTORIALS_DIR / name, tmp_path, fast=False)


# ---------------------------------------------------------------------------------------------------
# notebook format


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_is_percent_format(tutorial):
    text = tutorial.read_text(encoding="utf-8")
    header = re.match(r"# ---\n(# .*\n|#\n)*?# ---\n", text)
    assert header, f"{tutorial.name}: no jupytext header block at the top"
    assert "format_name: percent" in header.group(0), f"{tutorial.name}: header does not say format percent"
    code_cells = re.findall(r"^# %%\n", text, flags=re.MULTILINE)
    markdown_cells = re.findall(r"^# %% \[markdown\]\n", text, flags=re.MULTILINE)
    assert len(code_cells) >= 3 and len(markdown_cells) >= 3, (
        f"{tutorial.name}: {len(code_cells)} code cells and {len(markdown_cells)} markdown cells")
    assert text.index("# %% [markdown]") < text.index("# %%\n"), f"{tutorial.name}: should open with markdown"
    for match in re.finditer(r"^# %% \[markdown\]\n((?:.*\n)*?)(?=^# %%|\Z)", text, flags=re.MULTILINE):
        body = [line for line in match.group(1).splitlines() if line.strip()]
        assert body, f"{tutorial.name}: empty markdown cell"
        bad = [line for line in body if not line.startswith("#")]
        assert not bad, f"{tutorial.name}: markdown cell lines must start with '# ', got {bad[:3]}"


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_parses_with_jupytext(tutorial):
    jupytext = pytest.importorskip("jupytext", reason="jupytext not installed (pip install jupytext)")
    notebook = jupytext.read(tutorial)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds.count("code") >= 3 and kinds.count("markdown") >= 3, kinds
    assert notebook.metadata["jupytext"]["text_representation"]["format_name"] == "percent"
    # the file is jupytext's own rendering of the notebook: opening and saving it changes nothing
    # (except the version stamp, which jupytext sets to its own)
    def unstamped(text):
        return re.sub(r"jupytext_version: .*", "jupytext_version: ?", text)

    rendered = jupytext.writes(notebook, fmt="py:percent")
    assert unstamped(rendered) == unstamped(tutorial.read_text(encoding="utf-8"))


def test_readme_lists_every_tutorial():
    readme = (TUTORIALS_DIR / "README.md").read_text(encoding="utf-8")
    for tutorial in TUTORIALS:
        assert f"({tutorial.name})" in readme, f"tutorials/README.md does not link {tutorial.name}"
    assert "jupytext --to notebook tutorials/01_kto_loss_by_hand.py" in readme


# ---------------------------------------------------------------------------------------------------
# the executed notebooks (built by tutorials/build_notebooks.py; no kernel needed here)

NOTEBOOKS_MAX_BYTES = 4 * 2**20  # all notebooks together


def _notebook(tutorial: Path) -> dict:
    path = tutorial.with_suffix(".ipynb")
    assert path.exists(), f"{path.name} is missing: run python tutorials/build_notebooks.py {tutorial.name[:2]}"
    return json.loads(path.read_text(encoding="utf-8"))


def _text(source) -> str:
    return source if isinstance(source, str) else "".join(source)


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_notebook_cells_are_its_script(tutorial):
    jupytext = pytest.importorskip("jupytext", reason="jupytext not installed (pip install jupytext)")
    expected = [(cell.cell_type, cell.source) for cell in jupytext.read(tutorial).cells]
    cells = [(cell["cell_type"], _text(cell["source"])) for cell in _notebook(tutorial)["cells"]]
    assert cells == expected, (f"{tutorial.with_suffix('.ipynb').name} differs from {tutorial.name}: "
                               f"run python tutorials/build_notebooks.py {tutorial.name[:2]}")


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_notebook_is_executed_and_readable(tutorial):
    code = [cell for cell in _notebook(tutorial)["cells"] if cell["cell_type"] == "code"]
    assert all(cell["execution_count"] is not None for cell in code), "not executed"
    for cell in code:
        source = _text(cell["source"])
        for output in cell["outputs"]:
            assert output["output_type"] != "error", f"a cell failed:\n{source}"
            assert output.get("name") != "stderr", f"a cell wrote to stderr:\n{''.join(output['text'])}"
            plain = _text(output.get("data", {}).get("text/plain", ""))
            assert "<Figure size" not in plain and "Row(" not in plain, f"an unreadable result:\n{plain[:300]}"
        last_line = source.strip().splitlines()[-1].split("#")[0].strip()
        if last_line == "fig" or re.fullmatch(r"figures\[.*\]", last_line):
            assert any("image/png" in output.get("data", {}) for output in cell["outputs"]), \
                f"the figure of this cell is not shown inline:\n{source[-300:]}"


def test_notebooks_stay_small():
    sizes = {p.name: p.stat().st_size for p in TUTORIALS_DIR.glob("*.ipynb")}
    assert sum(sizes.values()) < NOTEBOOKS_MAX_BYTES, sizes
    assert sorted(sizes) == sorted(p.with_suffix(".ipynb").name for p in TUTORIALS), "a notebook without a script"
