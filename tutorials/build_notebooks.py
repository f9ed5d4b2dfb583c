"""Build the executed notebooks tutorials/*.ipynb from the percent scripts tutorials/*.py.

    python tutorials/build_notebooks.py              # every tutorial
    python tutorials/build_notebooks.py 06 08        # the ones whose names start so

Each script is converted with jupytext and run top to bottom in a fresh Python kernel (nbclient,
ipykernel) in its full settings (KTO_NP_TUTORIAL_FAST unset), from an empty temporary folder, with
KTO_NP_TUTORIAL_OUT in another temporary folder whose path is written as $KTO_NP_TUTORIAL_OUT in the
outputs. The notebook keeps the script's cells, their outputs and figures (inline PNGs), stable cell
ids, and no timing metadata. Needs: pip install jupytext nbclient ipykernel. tests/test_tutorials.py checks that
every notebook's cells are its script's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLACEHOLDER = "$KTO_NP_TUTORIAL_OUT"


def tutorial_scripts(prefixes=()) -> list[Path]:
    scripts = sorted(HERE.glob("[0-9][0-9]_*.py")) + sorted(HERE.glob("A[0-9]_*.py"))
    return [s for s in scripts if not prefixes or any(s.name.startswith(p) for p in prefixes)]


def _replace_in_outputs(cell, old: str, new: str) -> None:
    for output in cell.get("outputs", []):
        if "text" in output:
            output["text"] = output["text"].replace(old, new)
        for kind, value in output.get("data", {}).items():
            if kind.startswith("text/") and isinstance(value, str):
                output["data"][kind] = value.replace(old, new)


def _merge_streams(cell) -> None:
    """One stream output per run of stdout (or stderr) writes: how the kernel chunked them is timing."""
    merged = []
    for output in cell.get("outputs", []):
        if merged and output["output_type"] == "stream" and merged[-1]["output_type"] == "stream" \
                and merged[-1]["name"] == output["name"]:
            merged[-1]["text"] += output["text"]
        else:
            merged.append(output)
    cell["outputs"] = merged


def build(script: Path) -> tuple[Path, float]:
    import jupytext  # noqa: PLC0415
    import nbformat  # noqa: PLC0415
    from nbclient import NotebookClient  # noqa: PLC0415

    notebook = jupytext.read(script)
    with tempfile.TemporaryDirectory(prefix="kto_np_nb_out_") as out, \
            tempfile.TemporaryDirectory(prefix="kto_np_nb_cwd_") as cwd:
        os.environ["KTO_NP_TUTORIAL_OUT"] = out
        started = time.perf_counter()
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": cwd}}).execute()
        seconds = time.perf_counter() - started
        for index, cell in enumerate(notebook.cells):
            cell.metadata.pop("execution", None)
            cell["id"] = f"cell-{index:03d}"  # stable ids: a rebuild changes only what the run changed
            if cell.cell_type == "code":
                _merge_streams(cell)
            _replace_in_outputs(cell, out, PLACEHOLDER)
    notebook.metadata.pop("jupytext", None)
    path = script.with_suffix(".ipynb")
    nbformat.write(notebook, path)
    return path, seconds


def main(argv: list[str]) -> int:
    os.environ.pop("KTO_NP_TUTORIAL_FAST", None)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # tqdm.auto, imported by kto_np.train, warns in a kernel without ipywidgets (progress bars are off here)
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # tiny matrices
        os.environ.setdefault(name, "1")
    scripts = tutorial_scripts(argv)
    if not scripts:
        print(f"no tutorial matches {argv}", file=sys.stderr)
        return 2
    total = 0
    for script in scripts:
        path, seconds = build(script)
        size = path.stat().st_size
        total += size
        print(f"{path.name}: {seconds:.1f} s, {size / 1024:.0f} KiB")
    print(f"{len(scripts)} notebooks, {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
