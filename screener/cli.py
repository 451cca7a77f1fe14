"""The ``screener`` command line: one sub-command per job, each in its own module.

Sub-commands are imported lazily so that ``screener status`` does not pay for
torch, and a broken optional piece cannot stop the others.

Every command takes ``--log-format {human,json}`` (default: human lines on a terminal,
JSON lines otherwise); the dispatcher reads it so that the commands whose parser
does not list it (``phantom``, ``train``, ``evaluate``) follow it too. Exit statuses:
0 done, 1 the command ran and something failed, 2 a usage or configuration error
(one line on standard error that says what to fix), 141 output pipe closed early
(``screener results | head``), as a tool killed by SIGPIPE.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from screener.config import Config

#: sub-command -> (module, function, one-line help); each function takes argv (list of str)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("screener.serve", "main", "run the DICOM C-STORE SCP daemon (systemd service)"),
    "replay": ("screener.replay", "main", "process a folder of DICOM files through the pipeline"),
    "results": ("screener.results", "main", "export findings as CSV or JSON"),
    "status": ("screener.status", "main", "show queue, jobs and exports"),
    "purge": ("screener.purge", "main", "delete received studies and results older than N days"),
    "phantom": ("training.phantoms.cli", "main", "render a virtual cohort of synthetic patients"),
    "train": ("training.cli", "train_main", "train a protocol's model from a recipe (TOML)"),
    "evaluate": ("training.cli", "evaluate_main", "evaluate a model bundle: the paper's tables"),
}


#: Exit status when standard output was closed by the reader (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141


def add_log_format_option(p: argparse.ArgumentParser) -> None:
    """Add ``--log-format {human,json}`` to a command's parser."""
    from screener.logs import LOG_FORMATS
    p.add_argument("--log-format", choices=LOG_FORMATS + ("console",), default=None,
                   help="log lines on stderr: human (default on a terminal) or json (default "
                        "otherwise: systemd, pipes); console is an alias of human")


def command_parser(name: str, description: str, epilog: str | None = None
                   ) -> argparse.ArgumentParser:
    """An argument parser for ``screener NAME`` with the ``--config``, ``--data-dir`` and
    ``--log-format`` options."""
    p = argparse.ArgumentParser(prog=f"screener {name}", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config (default: $SCREENER_CONFIG, else "
                                    "/etc/screener/screener.toml when it exists, else built-in "
                                    "defaults): the file screener serve uses")
    p.add_argument("--data-dir", type=Path, help="data directory (database, results, outbox); "
                                                 "overrides the config")
    add_log_format_option(p)
    return p


def command_config(name: str, args: argparse.Namespace, *, writes: bool = False
                   ) -> Config | None:
    """The effective :class:`~screener.config.Config` for parsed ``args``, with logging
    configured (``--log-format``) and the data directory checked; or ``None`` after printing
    the one-line error (the caller exits with status 2).

    Parameters
    ----------
    name : str
        The command, for the error line.
    args : argparse.Namespace
        With ``config``, ``data_dir`` and ``log_format``.
    writes : bool
        The command writes into the data directory (``replay``, ``purge``): create it and
        check that it is writable; ``False`` (default) only checks that it is not a file.
    """
    from screener.config import ConfigError, find_config_path, load_config
    from screener.logs import configure_logging
    try:
        cfg = load_config(find_config_path(args.config), data_dir=args.data_dir)
        configure_logging(cfg.log_level, json=_json_logs(getattr(args, "log_format", None)))
        cfg.check_data_dir(create=writes)
    except (ConfigError, ValueError) as exc:
        print(f"screener {name}: {exc}", file=sys.stderr)
        return None
    return cfg


def _json_logs(choice: str | None) -> bool | None:
    """``True``/``False`` for an explicit ``--log-format``, ``None`` to follow the default."""
    from screener.logs import resolve_log_format
    return None if not choice else resolve_log_format(choice) == "json"


def _pop_log_format(args: list[str]) -> tuple[list[str], str | None]:
    """Take ``--log-format X`` / ``--log-format=X`` out of ``args`` (before a ``--``).

    Raises
    ------
    ValueError
        The option has no value or a value other than human / json.
    """
    from screener.logs import resolve_log_format
    out: list[str] = []
    value: str | None = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        if a == "--log-format" or a.startswith("--log-format="):
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(args):
                value = args[i + 1]
                i += 1
            else:
                raise ValueError("--log-format needs a value: human or json")
            value = resolve_log_format(value)
        else:
            out.append(a)
        i += 1
    return out, value


def _usage() -> str:
    lines = ["usage: screener COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'screener COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _dispatch(args: list[str]) -> int:
    if not args:
        print(_usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
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
    try:
        rest, log_format = _pop_log_format(args[1:])
    except ValueError as exc:
        print(f"screener {name}: {exc}", file=sys.stderr)
        return 2
    from screener.logs import LOG_FORMAT_ENV, configure_logging
    if log_format:
        os.environ[LOG_FORMAT_ENV] = log_format  # read by configure_logging in the command
    # every command logs to stderr in the chosen format from the start; commands that read a
    # configuration set its log_level again (command_config, serve)
    configure_logging("info")
    module, func, _ = COMMANDS[name]
    fn: Callable[[list[str]], int | None] = getattr(importlib.import_module(module), func)
    try:
        rc = fn(rest)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return int(rc or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a sub-command; returns the process exit status.

    Without a command the usage goes to standard error with status 2. A reader that
    closes standard output early (``screener -h | head -1``) ends the command quietly
    with status 141, as a tool killed by SIGPIPE, instead of a traceback.
    """
    try:
        rc = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that nothing is printed.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
