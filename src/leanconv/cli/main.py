"""``leanconv`` command line: argv -> config -> library call.

Each subcommand lives in its own module: its docstring (the paragraph after the first line is
the ``--help`` description), ``HELP`` (its line in ``leanconv --help``), ``add_arguments(p)``
and ``run(args) -> int``. User errors (``LeanconvError``, bad
arguments) print one line and exit with status 2; a file-system error prints one line and exits
with 1 (``-v`` shows its traceback); Ctrl-C exits with 130. A command runs with glibc keeping
freed memory (:func:`leanconv.cost.runtimes.steady_allocator`): eager PyTorch then stops
faulting its activations' pages in at every step (a ResNet-20 training process about 10%
faster), and training and timing on ``torch`` see the same allocator.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from leanconv import __version__
from leanconv.cli.common import check_data_spec, check_out_file, check_out_folder, check_path_text, describe
from leanconv.errors import LeanconvError

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

# Subcommand modules, in the order --help lists them.
SUBCOMMANDS = ["demo", "import", "train", "eval", "profile", "sensitivity", "prune", "latency-table", "prune3d",
               "convert", "explore", "compare", "report", "export", "fold"]
MODULES = {"import": "import_model", "latency-table": "latency_table"}  # a subcommand whose module cannot carry its name
# The paths (or model names) a command reads, by their argparse names: checked as text (empty, too
# long) before any work.
READ_PATHS = ("ckpt", "model", "source", "dir", "from_ckpt", "weights", "data_dir", "cache_dir")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other leanconv error."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse API
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        self.exit(2, f"leanconv: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leanconv",
        description="Make CNNs physically smaller and measurably faster: HAP and classic channel pruning, "
        "3-D (depth x width x resolution) pruning, sliding-channel and periodic sparse convolutions.",
    )
    parser.add_argument("--version", action="version", version=f"leanconv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = {}  # name -> its parser
    for name in SUBCOMMANDS:
        command = importlib.import_module(f"leanconv.cli.{MODULES.get(name, name)}")
        p = sub.add_parser(name, help=command.HELP,
                           description=describe(command.__doc__, **getattr(command, "DOC_FIELDS", {})))
        command.add_arguments(p)
        p.set_defaults(func=command.run)
        parser.commands[name] = p
    return parser


def _one_line(exc: BaseException) -> str:
    """An error's message on one line: a line break in a value it quotes (a path, a name) escaped."""
    return str(exc).replace("\r", "\\r").replace("\n", "\\n")


def _option(parser: argparse.ArgumentParser, dest: str) -> str:
    """How ``--help`` names the argument stored as ``dest``: its first flag, else its metavar."""
    action = next(a for a in parser._actions if a.dest == dest)  # noqa: SLF001 - argparse keeps no public index
    return action.option_strings[0] if action.option_strings else action.metavar or dest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser, whose --help lists what it takes
        parser.commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        for name in READ_PATHS:
            if isinstance(getattr(args, name, None), str):
                check_path_text(getattr(args, name), _option(parser.commands[args.command], name))
        if isinstance(getattr(args, "data", None), str):
            check_data_spec(args.data)
        if getattr(args, "out_is_folder", False):
            check_out_folder(args.out)
        if getattr(args, "out_file", None):
            check_out_file(getattr(args, args.out_file), "--" + args.out_file.replace("_", "-"))
        from leanconv.cost.runtimes import steady_allocator

        steady_allocator()
        return int(args.func(args) or 0)
    except LeanconvError as exc:
        print(f"leanconv: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused a read or write (disk full, permissions, a folder in the way)
        if args.verbose:
            raise
        print(f"leanconv: error: {_one_line(exc)} (every file leanconv writes is written whole or not at all)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("leanconv: interrupted; finished work is saved (re-run with --resume where offered)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
