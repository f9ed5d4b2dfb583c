"""The gradient oracle: float64 reference cases for KTO implementations, and a checker that names mistakes.

Someone writing KTO in PyTorch, JAX or TRL checks their loss, rewards and gradients against ours:

    report = verify(my_kto_loss, kind="kto_loss", variant="kto")
    print(report)                 # per case and quantity: max abs / rel error, first mismatch
    report.diagnosis.mistakes     # e.g. ("z_not_detached",): the known mistake the numbers match

`export(out_dir)` writes the same cases as one .npz per case (NumPy only, no pickle) plus a
manifest.json; `load_cases(out_dir)` reads them back and refuses anything that does not match.
docs/ORACLE.md describes the format, the candidate signatures per kind and the diagnosable mistakes.

The modules, in the order they build on each other:
  cases       the reference cases (inputs, and what kto_np's own core computes on them); model_edifice's
              arrays come from ../edifice_case.py (Edifice's network, Axon names, the unshifted contract)
  mistakes    the catalogue of known mistakes and their mutated formulas
  report      comparing numbers, the Report and the diagnosis
  store       export and load of the file store (manifest.json + one .npz per case)
  candidates  calling a candidate: NumPy, torch autograd, finite differences (KIND_ARGUMENTS: one per kind)
  conventions a candidate's own signature mapped onto the oracle's call (CONVENTIONS: kto_np, split)
  loader      loading a candidate from a spec
  isolation   running it in a child process (worker.py) with a time limit; the verdict stays in the parent
  check       verify, and the command-line entry points
  results     results files from any language: compare CASES_DIR RESULTS.json
  jax_support gradients of JAX candidates by jax.grad (as autograd for torch)
  trl         the installed TRL's own KTOTrainer checked: `kto-np oracle trl` (optional extra oracle-trl)

The pipeline kinds (PIPELINE_KINDS), with the mistakes found in real code (mistakes.REAL_CODE_MISTAKES):
  kl_pairs          how prompts are paired with completions for the KL estimate
  distributed       data_parallel and accumulation: cases, references, mutants, the accumulation runner
  dp_launch         the data_parallel ranks: R processes in a torch.distributed gloo group on 127.0.0.1
  dp_worker         one rank (and the launcher that forks them)
  pipeline_results  their entries in results files
"""

from . import distributed, kl_pairs  # noqa: F401  (importing them registers the pipeline kinds)
from .candidates import FD_DIRECTIONS, FD_FULL_MAX_ENTRIES, FD_STEP, builtin_candidate
from .cases import KINDS, KL_ROTATION, KL_ROTATIONS, PIPELINE_KINDS, VARIANTS, Case, generate_cases, make_kto_case
from .check import main_check, main_export, verify
from .conventions import CONVENTIONS, Convention
from .dp_launch import data_parallel_session
from .isolation import DEFAULT_TIMEOUT
from .loader import LoadError, load_callable
from .mistakes import KNOWN_MISTAKES, Mistake
from .report import TOLERANCES, Check, Diagnosis, Report
from .results import RESULTS_FORMAT, RESULTS_VERSION, compare_results, main_compare, results_document, write_results
from .store import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, export, load_cases

MISTAKES = KNOWN_MISTAKES  # the old name (data.MISTAKES is the toy task's wrong answers, another thing)

__all__ = [
    "DEFAULT_TIMEOUT",
    "FD_DIRECTIONS",
    "FD_FULL_MAX_ENTRIES",
    "FD_STEP",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "KL_ROTATION",
    "KL_ROTATIONS",
    "KNOWN_MISTAKES",
    "MANIFEST_NAME",
    "MISTAKES",
    "PIPELINE_KINDS",
    "RESULTS_FORMAT",
    "RESULTS_VERSION",
    "TOLERANCES",
    "VARIANTS",
    "Case",
    "CONVENTIONS",
    "Check",
    "Convention",
    "Diagnosis",
    "LoadError",
    "Mistake",
    "Report",
    "builtin_candidate",
    "compare_results",
    "data_parallel_session",
    "export",
    "generate_cases",
    "load_callable",
    "load_cases",
    "make_kto_case",
    "main_check",
    "main_compare",
    "main_export",
    "results_document",
    "verify",
    "write_results",
]
