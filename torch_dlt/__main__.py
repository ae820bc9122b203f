"""Command line: ``torch-dlt diagnose`` (also ``python -m torch_dlt diagnose``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-dlt", description="torch_dlt command line")
    sub = parser.add_subparsers(dest="command", required=True)
    diag = sub.add_parser(
        "diagnose",
        help="write an HTML report: theory's predictions next to measurements on a model",
        description=(
            "Diagnose a model: its mean-field phase at initialisation, per-layer signal "
            "statistics, and its input-output Jacobian spectrum against the prediction. "
            "Without --model: LeNet-5 on the scikit-learn digits."
        ),
    )
    diag.add_argument(
        "--model",
        metavar="PACKAGE.MODULE:FACTORY",
        help="a callable returning an nn.Module, or (module, (inputs, targets))",
    )
    diag.add_argument("--out", default="reports/diagnose.html", help="HTML file to write")
    diag.add_argument("--activation", help="activation name, when it cannot be read from the model")
    diag.add_argument("--sections", nargs="+", help="run only these sections")
    diag.add_argument("--batch-size", type=int, default=256)
    diag.add_argument("--seed", type=int, default=0)
    diag.add_argument("--quick", action="store_true", help="smaller probes (a smoke run)")
    diag.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from torch import nn

    from torch_dlt.report.diagnose import diagnose, load_factory

    model, data, name = None, None, None
    if args.model:
        try:
            made = load_factory(args.model)()
        except ValueError as exc:
            print(f"torch-dlt diagnose: {exc}", file=sys.stderr)
            return 2
        if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
            model, data = made
        elif isinstance(made, nn.Module):
            model = made
        else:
            print(
                f"torch-dlt diagnose: {args.model} returned {type(made).__name__}; "
                "expected an nn.Module or (module, data)",
                file=sys.stderr,
            )
            return 2
        name = args.model
    try:
        report = diagnose(
            model,
            data,
            activation=args.activation,
            out=args.out,
            sections=args.sections,
            batch_size=args.batch_size,
            seed=args.seed,
            quick=args.quick,
            progress=not args.no_progress,
            model_name=name,
        )
    except (ValueError, TypeError) as exc:
        print(f"torch-dlt diagnose: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"\nreport written to {report.path.resolve()} ({report.seconds:.1f} s)")
    return 1 if any(s.error for s in report.sections) else 0


if __name__ == "__main__":
    sys.exit(main())
