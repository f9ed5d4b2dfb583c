"""The `kto-np` command line: one subcommand per job (see `kto-np --help`)."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck import format_report, loss_and_logprob_checks  # noqa: PLC0415

    rows = loss_and_logprob_checks(seed=args.seed)
    print(format_report(rows, title="Log-probabilities and KTO losses (float64, central differences)"))
    failed = [r for r in rows if not r.passed]
    worst = max(rows, key=lambda r: r.rel_error)
    print(f"\n{len(rows) - len(failed)}/{len(rows)} passed; worst relative error {worst.rel_error:.2e} ({worst.name})")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kto-np",
        description="KTO from scratch in NumPy: hand-written gradients, checked by finite differences.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("gradcheck", help="check every hand-written gradient against finite differences",
                       description="Check compute_logprobs, every KTO loss variant and DPO against "
                       "central finite differences in float64; print one row per tensor. "
                       "Exit status 0 when every row passes, 1 otherwise.")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    p.set_defaults(func=_cmd_gradcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
