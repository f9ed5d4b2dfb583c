"""The `kto-np` command line: one subcommand per job (see `kto-np --help`)."""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import __version__

# OpenBLAS's idle threads spin for a while after each matrix product and take the cores the fast room's
# threads need (kto_np/fast/threads.py; docs/SPEED.md): the command shortens the spin before NumPy loads,
# unless the environment says otherwise. (A library user sets it the same way, before importing NumPy.)
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

COMMANDS = ("gradcheck", "figures", "oracle", "bench", "demo", "train", "exercise")
# TrainConfig fields that have a command-line option (the rest come from the preset)
TRAINING_OPTIONS = ("steps", "sft_steps", "variant", "beta", "desirable_weight", "undesirable_weight",
                    "desirable_fraction", "lr", "seed", "dtype", "backend", "architecture", "token_embedding")


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck import format_report  # noqa: PLC0415
    from .gradcheck_suite import loss_and_logprob_checks, model_checks  # noqa: PLC0415
    from .losses import VARIANTS  # noqa: PLC0415

    rows = loss_and_logprob_checks(seed=args.seed)
    print(format_report(rows, title="Log-probabilities and KTO losses (float64, central differences, "
                                    "pass: rel err <= 1e-7)"))
    model_rows = model_checks(seed=args.seed, variant="kto")
    print()
    print(format_report(model_rows, title="GPT-2 end to end: d(KTO loss, variant kto)/d(every parameter) "
                                          "(V=11 C=12 NH=3 L=2 T=6 B=4, float64, pass: rel err <= 1e-6)"))
    print("\nOther model variants and options (worst tensor of each):")
    all_rows = rows + model_rows
    for variant in VARIANTS:
        for positional in ("learned", "sinusoidal"):
            for tie in (True, False):
                checked = model_checks(seed=args.seed, variant=variant, positional=positional, tie_embeddings=tie)
                all_rows += checked
                worst = max(checked, key=lambda r: r.rel_error)
                ok = all(r.passed for r in checked)
                print(f"  {variant:<18} {positional:<10} {'tied' if tie else 'untied':<6} "
                      f"worst {worst.rel_error:.2e} ({worst.name})  {'pass' if ok else 'FAIL'}")
    print("\nEdifice's backbone (architecture edifice, every parameter; worst tensor of each):")
    for variant in VARIANTS:
        for token_embedding in ("fixed", "learned"):
            checked = model_checks(seed=args.seed, variant=variant, architecture="edifice",
                                   token_embedding=token_embedding)
            all_rows += checked
            worst = max(checked, key=lambda r: r.rel_error)
            ok = all(r.passed for r in checked)
            print(f"  {variant:<18} {token_embedding + ' embedding':<17} "
                  f"worst {worst.rel_error:.2e} ({worst.name})  {'pass' if ok else 'FAIL'}")
    failed = [r for r in all_rows if not r.passed]
    worst = max(all_rows, key=lambda r: r.rel_error / r.tolerance)
    print(f"\n{len(all_rows) - len(failed)}/{len(all_rows)} tensors passed; closest to its tolerance: "
          f"{worst.name} at {worst.rel_error:.2e} (tolerance {worst.tolerance:.0e})")
    return 1 if failed else 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from .plots import load_metrics_records, make_all_figures  # noqa: PLC0415
    from .train import run_token_gradients  # noqa: PLC0415

    if not args.out:
        print("kto-np figures: error: --out must be a folder name, got an empty string", file=sys.stderr)
        return 2
    records, token_gradients = None, None
    if args.run is not None:
        metrics_path = os.path.join(args.run, "metrics.jsonl")
        if not os.path.isfile(metrics_path):
            print(f"kto-np figures: error: --run {args.run!r} has no metrics.jsonl (run kto-np demo first)",
                  file=sys.stderr)
            return 2
        try:
            records = load_metrics_records(metrics_path)
            token_gradients = run_token_gradients(args.run) if os.path.isfile(
                os.path.join(args.run, "checkpoints", "reference.npz")) else None
        except (OSError, TypeError, ValueError) as exc:  # a damaged run folder: CheckpointError included
            print(f"kto-np figures: error: --run {args.run!r} is damaged: {exc}", file=sys.stderr)
            return 2
    try:
        paths = make_all_figures(args.out, metrics_records=records, token_gradients=token_gradients,
                                 seed=args.seed)
    except OSError as exc:
        print(f"kto-np figures: error: cannot write to {args.out!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as exc:  # records that are not a run's (no phase, no step, ...)
        print(f"kto-np figures: error: --run {args.run!r} is damaged: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if args.run is not None and os.path.isfile(os.path.join(args.run, "checkpoints", "kto.npz")):
        from .landscape import LandscapeError, run_landscape  # noqa: PLC0415

        has_trajectory = os.path.isdir(os.path.join(args.run, "trajectory"))
        try:  # the landscape figures of the run's policy (landscape_*.png; kto-np landscape has the options)
            written = run_landscape(args.run, args.out, directions=("random", "pca") if has_trajectory else "random",
                                    seed=args.seed, write_data=False, progress=False, log=lambda *a: None)["paths"]
        except (LandscapeError, OSError) as exc:  # the other figures are written: one line, still success
            print(f"kto-np figures: warning: no landscape figures: {exc}", file=sys.stderr)
        except (TypeError, ValueError) as exc:  # a damaged checkpoint: CheckpointError included
            print(f"kto-np figures: error: --run {args.run!r} is damaged: {exc}", file=sys.stderr)
            return 2
        else:
            for path in written:
                print(path)
    if records is None:
        print("(training_curves.png needs a run: kto-np figures --run runs/demo)")
    return 0


def _cmd_oracle_export(args: argparse.Namespace) -> int:
    from .oracle import main_export  # noqa: PLC0415

    return main_export(args.out_dir, overwrite=args.overwrite)


def _cmd_oracle_check(args: argparse.Namespace) -> int:
    from .oracle import main_check  # noqa: PLC0415

    if args.ecosystem and args.convention:
        print("kto-np oracle check: give --ecosystem or --convention, not both", file=sys.stderr)
        return 2
    tolerance = args.tolerance
    if tolerance is None:  # an ecosystem whose code computes in float32 (given, or detected) is checked so
        from .oracle.integrations.ecosystems import ECOSYSTEMS, detect_from_file  # noqa: PLC0415

        ecosystem = ECOSYSTEMS[args.ecosystem] if args.ecosystem else (
            None if args.convention else detect_from_file(args.spec))
        tolerance = ecosystem.tolerance if ecosystem is not None else "float64"
    return main_check(args.spec, kind=args.kind, variant=args.variant, cases_dir=args.cases,
                      tolerance=tolerance, timeout=args.timeout, convention=args.ecosystem or args.convention,
                      kl_rotation=args.kl_rotation, show_all=args.all)


def _cmd_oracle_liger(args: argparse.Namespace) -> int:
    from .oracle.integrations.liger import main_liger  # noqa: PLC0415

    return main_liger(args.tolerance)


def _cmd_oracle_compare(args: argparse.Namespace) -> int:
    from .oracle import main_compare  # noqa: PLC0415

    return main_compare(args.cases_dir, args.results, tolerance=args.tolerance, show_all=args.all)


def _cmd_exercise_list(args: argparse.Namespace) -> int:
    from .exercises import main_list  # noqa: PLC0415

    return main_list(args.lesson)


def _cmd_exercise_check(args: argparse.Namespace) -> int:
    from .exercises import main_check  # noqa: PLC0415

    return main_check(args.exercise_id, args.spec, timeout=args.timeout)


def _cmd_landscape(args: argparse.Namespace) -> int:
    from .landscape import LandscapeError, run_landscape  # noqa: PLC0415

    log = (lambda *a, **k: None) if args.quiet else print
    try:
        run_landscape(args.run, args.out, variant=args.variant, directions=args.directions, points=args.points,
                      span=args.span, seed=args.seed, num_examples=args.examples,
                      eval_prompts=args.eval_prompts, progress=not args.quiet, log=log)
    except LandscapeError as exc:
        print(f"kto-np landscape: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kto-np landscape: error: cannot write to {args.out!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_oracle_trl(args: argparse.Namespace) -> int:
    from .oracle.integrations.trl import main_trl  # noqa: PLC0415

    return main_trl(args.level)


def _int_at_least(minimum: int):
    kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value

    return parse


positive_int, nonnegative_int = _int_at_least(1), _int_at_least(0)


def _float_in(low: float, high: float | None = None, *, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high else ')'}"
            raise argparse.ArgumentTypeError(f"expected a number in {bound}, got {text}")
        return value

    return parse


def _add_training_options(p: argparse.ArgumentParser, defaults) -> None:
    from .losses import VARIANTS  # noqa: PLC0415

    p.add_argument("--steps", type=positive_int, default=defaults.steps,
                   help=f"KTO steps (default: {defaults.steps})")
    p.add_argument("--sft-steps", type=nonnegative_int, default=defaults.sft_steps,
                   help=f"SFT steps of the reference (default: {defaults.sft_steps})")
    p.add_argument("--variant", choices=VARIANTS, default=defaults.variant,
                   help=f"KTO loss variant (default: {defaults.variant})")
    p.add_argument("--beta", type=_float_in(0.0, low_open=True), default=defaults.beta,
                   help=f"KTO beta, > 0 (default: {defaults.beta})")
    p.add_argument("--desirable-weight", type=_float_in(0.0), default=defaults.desirable_weight,
                   help=f"lambda_D (default: {defaults.desirable_weight})")
    p.add_argument("--undesirable-weight", type=_float_in(0.0), default=defaults.undesirable_weight,
                   help=f"lambda_U (default: {defaults.undesirable_weight})")
    p.add_argument("--desirable-fraction", type=_float_in(0.0, 1.0), default=defaults.desirable_fraction,
                   help="fraction of thumbs-up examples in the KTO data, e.g. 0.1 for an imbalanced "
                   f"set (default: {defaults.desirable_fraction})")
    p.add_argument("--lr", type=_float_in(0.0, low_open=True), default=defaults.lr,
                   help=f"KTO learning rate (default: {defaults.lr})")
    p.add_argument("--seed", type=nonnegative_int, default=defaults.seed, help="seed of everything (default: 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=defaults.dtype,
                   help=f"parameter and activation dtype (default: {defaults.dtype})")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=defaults.backend,
                   help="array library: numpy (CPU) or cupy (GPU, needs the gpu extra) (default: numpy)")
    p.add_argument("--architecture", choices=("gpt2", "edifice"), default=defaults.architecture,
                   help="the network: gpt2, or edifice (Edifice.Meta.KTO.build's own backbone) (default: gpt2)")
    p.add_argument("--token-embedding", choices=("fixed", "learned"), default=defaults.token_embedding,
                   help="--architecture edifice only: Edifice's fixed embedding (its default; the logits then "
                   "ignore the token ids) or a learned table")
    p.add_argument("--out", default=None, help="run folder (default: runs/<command>)")
    p.add_argument("--force", action="store_true", help="overwrite the run files in an existing --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoint (its saved options win)")
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="start KTO from this reference (a checkpoint file, or a run folder's "
                   "checkpoints/reference.npz) instead of training one: no SFT; its model must be this run's")
    p.add_argument("--quiet", action="store_true", help="print only the final table; no progress bar")


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import RunError, TrainConfig, TrainingDiverged, run  # noqa: PLC0415

    if args.force and args.resume:
        print(f"kto-np {args.command}: error: --force and --resume cannot be used together", file=sys.stderr)
        return 2
    if args.out == "":
        print(f"kto-np {args.command}: error: --out must be a folder name, got an empty string", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else f"runs/{args.command}"
    try:
        config = TrainConfig(
            steps=args.steps, sft_steps=args.sft_steps, variant=args.variant, beta=args.beta,
            desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
            desirable_fraction=args.desirable_fraction, lr=args.lr, seed=args.seed, dtype=args.dtype,
            backend=args.backend, architecture=args.architecture, token_embedding=args.token_embedding,
            **args.preset)
    except (TypeError, ValueError) as exc:
        print(f"kto-np {args.command}: error: {exc}", file=sys.stderr)
        return 2
    log = (lambda *a, **k: None) if args.quiet else print
    try:
        summary = run(config, out, force=args.force, resume=args.resume, progress=not args.quiet, log=log,
                      reference=args.reference)
    except (RunError, ImportError) as exc:
        print(f"kto-np {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a file-size limit, a folder removed under the run
        print(f"kto-np {args.command}: error: cannot write the run folder {out!r}: {exc.strerror or exc} "
              "(every file written before is intact: free the space and continue with --resume)", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"kto-np {args.command}: training diverged: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary, out))
    return 0


def format_summary(summary: dict, out: str) -> str:
    """The before/after table printed at the end of a run."""
    before, after = summary["modes_before"], summary["modes_after"]
    rows = [("desirable rate", f"{summary['desirable_rate_before']:.1%}", f"{summary['desirable_rate_after']:.1%}")]
    for kind in sorted(set(before) | set(after), key=lambda k: (k != "correct", k)):
        rows.append((f"  {kind}", f"{before.get(kind, 0.0):.1%}", f"{after.get(kind, 0.0):.1%}"))
    margin, kl = summary.get("reward_margin"), summary.get("kl")
    rows.append(("reward margin (chosen - rejected)", "", "n/a" if margin is None else f"{margin:+.3f}"))
    rows.append(("KL estimate z", "", "n/a" if kl is None else f"{kl:.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'reference':>10}  {'policy':>10}"]
    lines += [f"{name:<{width}}  {b:>10}  {a:>10}" for name, b, a in rows]
    lines.append(f"\n{summary['eval_prompts']} held-out prompts, {summary['steps']} KTO steps "
                 f"({summary['variant']}), {summary['seconds']:.0f} s. Run folder: {out}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kto-np",
        description="KTO from scratch in NumPy: hand-written gradients, checked by finite differences.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # required: checked in _parse

    p = sub.add_parser("gradcheck", help="check every hand-written gradient against finite differences",
                       description="Check compute_logprobs, every KTO loss variant, DPO and the whole "
                       "model (every parameter, through every variant) against central finite differences "
                       "in float64; print one row per tensor. "
                       "Exit status 0 when every row passes, 1 otherwise.")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random inputs (default: 0)")
    p.set_defaults(func=_cmd_gradcheck)

    p = sub.add_parser("figures", help="regenerate every figure (PNG) from code",
                       description="Write every figure as a PNG into --out, deterministically: the value "
                       "functions, loss and gradient surfaces, KTO vs DPO vs APO-zero, the z gradient, class "
                       "balance, per-token gradients, and the training curves and loss landscapes of a run (--run).")
    p.add_argument("--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--run", default=None, help="a run folder whose metrics.jsonl gives training_curves.png")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the synthetic batches (default: 0)")
    p.set_defaults(func=_cmd_figures)

    from .oracle import CONVENTIONS, DEFAULT_TIMEOUT, KINDS, TOLERANCES  # noqa: PLC0415

    oracle = sub.add_parser("oracle", help="export float64 reference cases, or check another KTO implementation",
                            description="The gradient oracle: reference cases (float64) for other KTO "
                            "implementations, and a checker that names the wrong number and the likely mistake.")
    oracle_sub = oracle.add_subparsers(dest="oracle_command", metavar="ACTION", required=True)
    p = oracle_sub.add_parser("export", help="write the reference cases (.npz + manifest.json) to OUT_DIR",
                              description="Write every reference case (one .npz each, readable with NumPy "
                              "alone) and manifest.json to OUT_DIR. Refuses a non-empty OUT_DIR without --overwrite.")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the cases in a non-empty OUT_DIR")
    p.set_defaults(func=_cmd_oracle_export)
    p = oracle_sub.add_parser("check", help="check a function (package.module:function) against the cases",
                              description="Import SPEC (package.module:function or path/file.py:function) in a "
                              "child process, run it on every case of --kind and compare loss, gradient and "
                              "metrics here. Exit status 0 when it passes, 1 when it does not (an exit, crash or "
                              "timeout of the candidate included), 2 when it cannot be loaded.")
    p.add_argument("spec", metavar="SPEC", help="package.module:function, path/to/file.py:function, module:Class "
                   "or module:Class.method")
    p.add_argument("--kind", choices=KINDS, default="kto_loss", help="what the function computes (default: kto_loss)")
    p.add_argument("--variant", default=None,
                   help="loss variant for --kind kto_loss (kto, kto_pair, edifice, edifice_stop_z_grad, "
                   "apo_zero_unpaired; default: kto); model_kto: kto; model_edifice: edifice; kl_pairs: whole_batch "
                   "(default) or blocks; data_parallel: rank_means (TRL, default) or global_mean")
    p.add_argument("--cases", default=None, help="a folder written by 'oracle export' (default: generate in memory)")
    p.add_argument("--tolerance", choices=tuple(TOLERANCES), default=None,
                   help="tolerances for a float64 or a float32 implementation (default: float64; with --ecosystem, "
                   "float32 for halos and liger, whose code computes in float32)")
    p.add_argument("--timeout", type=_float_in(0.0, low_open=True), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="time limit per case; a case still running then fails as timed out "
                   f"(default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--convention", choices=tuple(c.name for c in CONVENTIONS.values() if c.detect is None),
                   default=None,
                   help="how SPEC is called: kto_np (the oracle's keywords) or split (policy_chosen_logps, ..., "
                   "reference_KL_logps -> losses, rewards, kl); default: detected from its parameter names")
    from .oracle.integrations.ecosystems import ECOSYSTEMS  # noqa: PLC0415

    p.add_argument("--ecosystem", choices=tuple(ECOSYSTEMS), default=None,
                   help="the project whose own source SPEC is, run as it sits in its file with what its code "
                   "reads around the loss (stand-in self, config, accelerator, one-rank torch.distributed): "
                   + "; ".join(f"{e.name}: {e.takes}" for e in ECOSYSTEMS.values())
                   + " (default: detected from the code's shape; docs/oracle/ecosystems.md)")
    p.add_argument("--kl-rotation", type=int, choices=(-1, 1), default=-1, metavar="{-1,+1}",
                   help="model_kto: the KL pairs SPEC builds, prompt i with completion i-1 (-1, TRL) or i+1 "
                   "(+1, OpenRLHF, HALOs); the reference is computed for the one declared (default: -1)")
    p.add_argument("--all", action="store_true", help="print every checked row, not only the failing ones")
    p.set_defaults(func=_cmd_oracle_check)
    p = oracle_sub.add_parser("compare", help="check numbers computed in any language (RESULTS.json) against "
                              "the cases in CASES_DIR",
                              description="Read RESULTS.json (format kto_np-oracle-results, "
                              "docs/oracle-results.schema.json) and compare its numbers with the cases exported to "
                              "CASES_DIR: the same report and diagnosis as 'check'. Exit status 0 when they "
                              "pass, 1 when they do not, 2 when the cases or the results cannot be read.")
    p.add_argument("cases_dir", metavar="CASES_DIR")
    p.add_argument("results", metavar="RESULTS.json")
    p.add_argument("--tolerance", choices=tuple(TOLERANCES), default="float64",
                   help="tolerances for numbers computed in float64 or float32 (default: float64)")
    p.add_argument("--all", action="store_true", help="print every checked row, not only the failing ones")
    p.set_defaults(func=_cmd_oracle_compare)
    p = oracle_sub.add_parser("trl", help="check the installed TRL's own KTOTrainer against the cases",
                              description="Drive the installed TRL's KTOTrainer (offline, nothing downloaded; TRL "
                              "1.0 to 1.16 measured, docs/oracle/trl.md): the loss level (loss_type kto and "
                              "apo_zero_unpaired, through kto_loss on TRL <= 1.5 or compute_loss with the batch keys "
                              "of the release's own collator on TRL >= 1.6) and the model level (the GPT-2 case "
                              "through TRL's dataset preparation, collator, log-prob head, KL pairs and loss; float32 "
                              "tolerance where TRL computes in float32). Exit status 0 when it passes, 1 when TRL's "
                              "numbers are wrong, 2 when TRL is absent or cannot be driven here (one line each "
                              "saying why; pip install \"kto_np[oracle-trl]\").")
    p.add_argument("--level", choices=("all", "loss", "model"), default="all",
                   help="what to check (default: all)")
    p.set_defaults(func=_cmd_oracle_trl)
    p = oracle_sub.add_parser("liger", help="check the installed Liger-Kernel's KTO loss against the cases",
                              description="Run the installed Liger-Kernel's LigerFusedLinearKTOLoss (a vocabulary of "
                              "two and one hidden unit whose log-probs are the cases') on the kto cases in a child "
                              "process. Exit status 0 when it passes, 1 when it does not, 2 when liger-kernel or "
                              "torch is absent (pip install liger-kernel).")
    p.add_argument("--tolerance", choices=tuple(TOLERANCES), default="float32",
                   help="float32 (default: Liger computes its log-probs in float32) or float64")
    p.set_defaults(func=_cmd_oracle_liger)

    exercise = sub.add_parser("exercise", help="the tutorials' graded exercises: list them, check your answer",
                              description="Graded exercises: a function you write for a lesson, checked by a "
                              "grader that says what is wrong (tutorials/README.md; solutions in "
                              "tutorials/solutions/).")
    exercise_sub = exercise.add_subparsers(dest="exercise_command", metavar="ACTION", required=True)
    p = exercise_sub.add_parser("list", help="every exercise: id, lesson, the function you write",
                                description="List the exercises (id, lesson, signature), in lesson order.")
    p.add_argument("--lesson", default=None, help="only this lesson's (01 ... 11, A1)")
    p.set_defaults(func=_cmd_exercise_list)
    p = exercise_sub.add_parser("check", help="grade a function (path/file.py:function) for exercise ID",
                                description="Load SPEC (path/file.py:function or package.module:function) in a "
                                "child process, run it on the exercise's inputs and grade the numbers here. Exit "
                                "status 0 when it passes, 1 when it does not (an exception, exit, crash or timeout "
                                "included), 2 when it cannot be loaded.")
    p.add_argument("exercise_id", metavar="ID", help="an exercise id, e.g. 01.kto_loss (kto-np exercise list)")
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function or package.module:function")
    p.add_argument("--timeout", type=_float_in(0.0, low_open=True), default=60.0, metavar="SECONDS",
                   help="time limit per call of the function (default: 60)")
    p.set_defaults(func=_cmd_exercise_check)

    from . import bench  # noqa: PLC0415

    p = sub.add_parser("bench", help="time one KTO training step against PyTorch CPU eager",
                       description="One KTO training step (policy forward + backward, reference and KL-pair "
                       "forwards, loss, AdamW) in kto_np and in an independent PyTorch implementation of the "
                       "same model, timed in one process; prints medians, the numpy/torch ratio, peak memory "
                       "and GFLOP/s. The last line is 'ratio numpy/torch medium: X.XX'.")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run_from_args)

    from .train import DEMO_PRESET, TRAIN_PRESET, TrainConfig  # noqa: PLC0415

    for name, preset, text in [
        ("demo", DEMO_PRESET, "SFT a small reference on a digit-sorting task, then align it with KTO "
         "from thumbs-up/down labels; print the desirable rate before and after (under a minute on 2 idle cores)"),
        ("train", TRAIN_PRESET, "the same as demo with a larger model and more steps, for longer runs"),
    ]:
        p = sub.add_parser(name, help=text.split(";")[0], description=text + ".")
        _add_training_options(p, TrainConfig(**preset))
        p.set_defaults(func=_cmd_train, preset={k: v for k, v in preset.items() if k not in TRAINING_OPTIONS})

    from .landscape import DIRECTIONS, LOSS_VARIANTS, MAX_POINTS, MIN_POINTS  # noqa: PLC0415

    p = sub.add_parser("landscape", help="loss landscapes of a run's policy (random, PCA, Hessian planes)",
                       description="The loss of a run's trained policy on a fixed batch of its own data, in "
                       "float64: a 2-D plane around the policy (--directions), the segment from the reference "
                       "to the policy with the desirable rate of samples, and the same policy under edifice, "
                       "edifice with stop_z_grad, kto and apo_zero_unpaired against a shift of every "
                       "log-probability. Writes landscape_<directions>.png, landscape_interpolation.png, "
                       "landscape_variants.png and landscape.npz (loss [N, N], alpha [N], beta [N]; the "
                       "policy at 0, 0).")
    p.add_argument("--run", required=True, help="a run folder (kto-np demo / train)")
    p.add_argument("--variant", choices=LOSS_VARIANTS, default=None,
                   help="the loss drawn in the plane and along the segment (default: the run's variant)")
    p.add_argument("--directions", choices=DIRECTIONS, default="random",
                   help="random: filter-normalised Gaussian; pca: the training trajectory's principal plane; "
                   "hessian: the top two Hessian eigen-directions (default: random)")
    p.add_argument("--points", type=int, default=21,
                   help=f"grid points per axis, in [{MIN_POINTS}, {MAX_POINTS}] (default: 21)")
    p.add_argument("--span", type=float, default=1.0,
                   help="half-width of the grid, > 0: filter-normalised units (random), the step where the "
                   "quadratic model has risen by the loss (hessian), 1.2 x the trajectory's extent (pca) "
                   "(default: 1.0)")
    p.add_argument("--examples", type=positive_int, default=None,
                   help="size of the fixed batch: the first examples of the run's data (default: 32)")
    p.add_argument("--eval-prompts", type=positive_int, default=128,
                   help="held-out prompts sampled for the desirable rate along the segment (default: 128)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/landscape)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random directions (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no file list")
    p.set_defaults(func=_cmd_landscape)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown option is named as such even before a COMMAND
    (argparse would only say that COMMAND is required)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error(f"the following arguments are required: COMMAND (one of {', '.join(COMMANDS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    try:  # the heavy imports (NumPy, the subcommands) happen in here, under the Ctrl-C handler
        parser = build_parser()
        args = _parse(parser, argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kto-np gradcheck | head`: stop quietly, like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
