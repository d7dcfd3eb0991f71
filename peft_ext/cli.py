"""The ``peft-ext`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_demo
    from .io import write_json

    report = run_demo(out_dir=args.out_dir, num_gates=args.gates, steps=args.steps, seed=args.seed)
    print(format_report(report))
    if args.out:
        write_json(args.out, report)
    return 0 if report["reload_exact"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-ext", description="Adapter families for Hugging Face PEFT.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="steer a tiny model with a log-gate controller, offline (~1 min on CPU)")
    demo.add_argument("--out-dir", help="where the base model and adapter are written (default: a temp dir)")
    demo.add_argument("--gates", type=int, default=64, help="sparse gate budget (default 64)")
    demo.add_argument("--steps", type=int, default=150, help="fit steps (default 150)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="also write the JSON report here")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
