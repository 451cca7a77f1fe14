"""The ``screener`` command line: one sub-command per job, each in its own module.

Sub-commands are imported lazily so that ``screener status`` does not pay for
torch, and a broken optional piece cannot stop the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Sequence

#: sub-command -> (module, function, one-line help); each function takes argv (list of str)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("screener.serve", "main", "run the DICOM C-STORE SCP daemon (systemd service)"),
    "replay": ("screener.replay", "main", "process a folder of DICOM files through the pipeline"),
    "results": ("screener.results", "main", "export findings as CSV or JSON"),
    "status": ("screener.status", "main", "show queue, jobs and exports"),
    "phantom": ("training.phantoms.cli", "main", "render a virtual cohort of synthetic patients"),
    "train": ("training.cli", "train_main", "train a protocol's model from a recipe (TOML)"),
    "evaluate": ("training.cli", "evaluate_main", "evaluate a model bundle: the paper's tables"),
}


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser for ``screener NAME`` with the ``--config`` and ``--data-dir`` options."""
    p = argparse.ArgumentParser(prog=f"screener {name}", description=description)
    p.add_argument("--config", help="TOML config (default: SCREENER_CONFIG or built-in defaults)")
    p.add_argument("--data-dir", type=Path, help="data directory (database, results, outbox)")
    return p


def command_config(name: str, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The effective :class:`~screener.config.Config` for parsed ``args``, or ``None`` after
    printing the configuration error (the caller exits with status 2)."""
    from screener.config import ConfigError, load_config
    try:
        return load_config(args.config, data_dir=args.data_dir)
    except ConfigError as exc:
        print(f"screener {name}: {exc}", file=sys.stderr)
        return None


def _usage() -> str:
    lines = ["usage: screener COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'screener COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from screener import __version__
        print(f"screener {__version__}")
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"screener: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    fn: Callable[[list[str]], int | None] = getattr(importlib.import_module(module), func)
    rc = fn(args[1:])
    return int(rc or 0)
