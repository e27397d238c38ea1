"""Command line: run, backfill, status, demo, generate. Errors are one line unless --debug."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from datetime import date
from importlib import metadata
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError, Terminated

log = logging.getLogger("pipeline")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    _setup_logging(getattr(args, "debug", False), getattr(args, "json", False))
    try:
        return int(args.handler(args, env))
    except PipelineError as exc:
        return _fail(args, exc, exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 1
    except Exception as exc:  # last resort: still one line, never a record's content
        return _fail(args, exc, 1, prefix=f"unexpected {type(exc).__name__}")


def _fail(args: argparse.Namespace, exc: BaseException, code: int, prefix: str = "error") -> int:
    if getattr(args, "debug", False):
        log.exception("failed")
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_pipeline.py", description=__doc__)
    parser.add_argument("--version", action="version", version=f"audience-pipeline {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="process every complete delivery not yet processed")
    _common(run)
    run.add_argument("--date", type=_date, help="only deliveries of this date (YYYY-MM-DD)")
    run.add_argument("--force", action="store_true", help="reprocess processed deliveries")
    run.add_argument("--full", action="store_true", help="export feeds: republish everything")
    run.set_defaults(handler=_cmd_run)

    backfill = sub.add_parser("backfill", help="reprocess the deliveries of a date range")
    _common(backfill)
    backfill.add_argument("--from", dest="date_from", type=_date, required=True)
    backfill.add_argument("--to", dest="date_to", type=_date, required=True)
    backfill.set_defaults(handler=_cmd_run)

    status = sub.add_parser("status", help="ledger summary: last runs, failed and pending")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true")
    status.add_argument("--debug", action="store_true")
    status.set_defaults(handler=_cmd_status)

    demo = sub.add_parser("demo", help="zero set-up end-to-end run on local S3 and SFTP servers")
    demo.add_argument("--output", default="demo-output", help="folder for outputs and state")
    demo.add_argument("--lines", type=int, default=2000)
    demo.add_argument("--keep", action="store_true",
                      help="keep the S3 and SFTP servers up after the runs (Ctrl-C stops)")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--debug", action="store_true")
    demo.set_defaults(handler=_cmd_demo)

    gen = sub.add_parser("generate", help="write synthetic deliveries and a profile snapshot")
    gen.add_argument("--output", required=True, help="folder to write feed/ and profiles/ into")
    gen.add_argument("--lines", type=int, default=10_000)
    gen.add_argument("--profiles", type=int, default=5_000)
    gen.add_argument("--files", type=int, default=2, help="split files per delivery")
    gen.add_argument("--deliveries", type=int, default=1)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--full-feeds", type=_feed_list, default=(),
                     help="feeds written as `full` deliveries: email,phone,ecid (default none)")
    gen.add_argument("--debug", action="store_true")
    gen.set_defaults(handler=_cmd_generate)
    return parser


def version() -> str:
    """The installed distribution's version; pyproject.toml's when running from a checkout."""
    try:
        return metadata.version("audience-pipeline")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text("utf-8"))["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--dry-run", action="store_true",
                   help="report what would be done, write nothing")
    p.add_argument("--json", action="store_true", help="print the run report as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    p.add_argument("--executor", choices=("local", "dask"),
                   help="where the heavy passes run (default: the config's, else local)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address, e.g. tcp://10.0.0.5:8786")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _feed_list(text: str) -> tuple[str, ...]:
    feeds = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in feeds if f not in ("email", "phone", "ecid")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown feed {unknown[0]!r} (email, phone, ecid)")
    return feeds


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "paramiko", "s3transfer", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # paramiko logs dropped sockets at ERROR; our StoreUnavailable already says it once.
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


def _cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from pipeline.config import load_config, with_executor
    from pipeline.console import Progress, print_report
    from pipeline.context import RunOptions
    from pipeline.run import execute

    config = with_executor(load_config(args.config, env), args.executor, args.scheduler)
    if args.command == "backfill" and args.date_from > args.date_to:
        raise ConfigError("--from must not be after --to")
    options = RunOptions(
        command=args.command,
        day=getattr(args, "date", None),
        date_from=getattr(args, "date_from", None),
        date_to=getattr(args, "date_to", None),
        force=getattr(args, "force", False),
        full=getattr(args, "full", False),
        dry_run=args.dry_run,
    )
    try:
        with Progress(enabled=not args.json) as progress:
            report = execute(config, options, on_delivery=progress.delivery_done)
    except BaseException as exc:
        died = getattr(exc, "run_report", None)  # the run died: its report says how
        if args.json and died is not None:
            print(json.dumps(died.to_dict(), indent=1))
        raise
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print_report(report)
    return report.exit_code()


def _cmd_status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from pipeline.config import load_config
    from pipeline.console import print_status
    from pipeline.status import summary

    config = load_config(args.config, env, secrets=False)  # the ledger needs no key
    data = summary(config)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print_status(data)
    return 0


def _localdev(command: str, *needs: str) -> None:
    """demo and generate live in the checkout's localdev/, outside the installed package."""
    import importlib.util

    for name in ("localdev", *needs):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"{command} needs the repository checkout and the demo extra: "
                              "make demo")


def _cmd_demo(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    _localdev("demo", "moto")
    from localdev.demo import run_demo

    return run_demo(args.output, lines=args.lines, as_json=args.json, keep=args.keep)


def _cmd_generate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    _localdev("generate")
    from localdev.generate import GenerateSpec, generate

    spec = GenerateSpec(lines=args.lines, profiles=args.profiles, files=args.files,
                        deliveries=args.deliveries, seed=args.seed,
                        full_feeds=args.full_feeds)
    result = generate(args.output, spec)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
