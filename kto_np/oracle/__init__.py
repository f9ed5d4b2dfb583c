"""The gradient oracle: float64 reference cases for KTO implementations, and a checker that names mistakes.

Someone writing KTO in PyTorch, JAX or TRL checks their loss, rewards and gradients against ours:

    report = verify(my_kto_loss, kind="kto_loss", variant="kto")
    print(report)                 # the verdict first, then the failing checks: max abs / rel error
    report.diagnosis.mistakes     # e.g. ("z_not_detached",): the known mistake the numbers match

`export(out_dir)` writes the same cases as one .npz per case (NumPy only, no pickle) plus a
manifest.json; `load_cases(out_dir)` reads them back and refuses anything that does not match.

The names below are imported on first use (PEP 562), so this file imports none of its parts. The parts,
each package building only on those before it:

  cases/         what is checked: the reference cases and what kto_np's own core computes on them
                 (reference.py; model_edifice's arrays from edifice_case.py), the catalogue of known
                 mistakes (mistakes.py), the file store (store.py), and the pipeline kinds' cases,
                 mutants and references (kl_pairs.py; distributed.py: data_parallel and accumulation)
  run/           running a candidate: calling it (candidates.py), its own signature mapped onto the
                 oracle's call (conventions.py), loading it from a spec (loader.py), and the one
                 child-process runner (runner.py, with worker.py its child) for isolation and for the
                 data-parallel ranks
  compare/       comparing and reporting: the Report and the diagnosis (report.py), results files from
                 any language (results.py; the pipeline kinds' entries in pipeline_results.py)
  integrations/  other projects' code: TRL's KTOTrainer (trl.py), Liger-Kernel (liger.py), the projects'
                 own source files (ecosystems.py), gradients of JAX candidates (jax_support.py)
  check.py       verify, and the command-line entry points `kto-np oracle check` and `export`
"""

from __future__ import annotations

from .._facade import lazy_facade

# exported name -> the module (below kto_np.oracle) that defines it
_EXPORTS = {
    "Case": "cases.reference",
    "KINDS": "cases.reference",
    "KL_ROTATION": "cases.reference",
    "KL_ROTATIONS": "cases.reference",
    "PIPELINE_KINDS": "cases.reference",
    "VARIANTS": "cases.reference",
    "generate_cases": "cases.reference",
    "make_kto_case": "cases.reference",
    "KNOWN_MISTAKES": "cases.mistakes",
    "Mistake": "cases.mistakes",
    "FORMAT_NAME": "cases.store",
    "FORMAT_VERSION": "cases.store",
    "MANIFEST_NAME": "cases.store",
    "export": "cases.store",
    "load_cases": "cases.store",
    "FD_DIRECTIONS": "run.candidates",
    "FD_FULL_MAX_ENTRIES": "run.candidates",
    "FD_STEP": "run.candidates",
    "builtin_candidate": "run.candidates",
    "CONVENTIONS": "run.conventions",
    "Convention": "run.conventions",
    "LoadError": "run.loader",
    "load_callable": "run.loader",
    "DEFAULT_TIMEOUT": "run.runner",
    "data_parallel_session": "run.runner",
    "TOLERANCES": "compare.report",
    "Check": "compare.report",
    "Diagnosis": "compare.report",
    "Report": "compare.report",
    "RESULTS_FORMAT": "compare.results",
    "RESULTS_VERSION": "compare.results",
    "compare_results": "compare.results",
    "main_compare": "compare.results",
    "results_document": "compare.results",
    "write_results": "compare.results",
    "main_check": "check",
    "main_export": "check",
    "verify": "check",
}
_ALIASES = {"MISTAKES": "KNOWN_MISTAKES"}  # the old name (data.MISTAKES is the toy task's wrong answers, another thing)

__all__ = sorted([*_EXPORTS, *_ALIASES])


__getattr__, __dir__ = lazy_facade(__name__, globals(), _EXPORTS, _ALIASES)
