"""`hmd`: one console script; each subcommand lives in the package that owns it.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Only the module of the subcommand being run is imported, so `hmd device` never
imports torch and `hmd --help` is instant. Every parser (sub-commands' sub-parsers
included) shows each option's default in ``--help`` (:class:`HelpFormatter`). Every command
takes ``-v``/``-q`` (:func:`add_verbosity_arguments`, unless it defines its own), and a command
can ask for checks that run on its parsed arguments before it starts (``run_checks``).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("models.cli_train", "train the multi-task network (GREAT or a baseline weighting)"),
    "export": ("models.cli_export", "export a trained model to ONNX (+ manifest, optional INT8)"),
    "defend": ("models.cli_defend", "train a classifier with an adversarial defence (GREAT+GREACE, FGSM-AT, ...)"),
    "distill": ("models.cli_distill", "distil a teacher into a student (GREAT, soft targets, none)"),
    "attack": ("models.cli_attack", "evaluate a model under FGSM/iFGSM/PGD/transfer attacks"),
    "device": ("device.cli", "run the headset: capture, inference, overlay, hot-swap, journal"),
    "cloud": ("cloud.cli", "the cloud retraining service (serve, add-device, devices, rotate-token, import-base)"),
    "personalise": ("hmd.personalise", "the cloud's personalisation job, offline: train, gate, signed export"),
    "demo": ("hmd.demo", "the whole loop on this machine, nothing to set up"),
    "bench": ("hmd.bench", "benchmarks: train | device | cloud | table4 | ... (JSON on stdout)"),
}


from hmd import __version__  # noqa: E402
from shared.console import set_verbosity  # noqa: E402
from shared.errors import UserError  # noqa: E402  (re-exported for subcommands)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default, or
    there is none to show (None, a flag's False, a suppressed option); descriptions are wrapped
    paragraph by paragraph (a blank line separates two)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(super(HelpFormatter, self)._fill_text(p, width, indent) for p in text.split("\n\n"))

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        return bool(action.option_strings) and not nothing and text != argparse.SUPPRESS and "default" not in text

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not self._shows_default(action):
            return action.help
        return f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse skips help-less options' help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with :class:`HelpFormatter`; sub-parsers made by ``add_subparsers`` are of this
    class too, so `hmd cloud serve --help` shows its defaults like every other command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` on a command, or on each of its sub-commands (`hmd cloud devices -q`), unless
    it has its own (`hmd device`, `hmd cloud serve`)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        for sub in subs[0].choices.values():
            add_verbosity_arguments(sub)
        return
    if "-v" in parser._option_string_actions or "-q" in parser._option_string_actions:
        return
    loud = parser.add_argument_group("output").add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="count", default=0,
                      help="more detail: the DEBUG logs of great-hmd's modules, FFmpeg's own messages")
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress lines: only results and errors")


def _top_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="hmd",
        description="great-hmd: GREAT-trained multi-task vision for head-mounted displays.",
    )
    parser.add_argument("--version", action="version", version=f"hmd (great-hmd) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, helptext) in COMMANDS.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and not argv[0].startswith("-"):
            parser.print_usage(sys.stderr)
            print(f"hmd: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
            return 2
        parser.parse_args(argv)  # handles --help / prints usage
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, helptext = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # a subcommand whose package is not installed/built yet
        if exc.name and module_name.startswith(exc.name):
            print(f"hmd: the '{name}' command is not available in this build ({exc})", file=sys.stderr)
            return 2
        raise
    parser = ArgumentParser(prog=f"hmd {name}", description=helptext)
    module.add_arguments(parser)
    add_verbosity_arguments(parser)
    args = parser.parse_args(argv[1:])
    verbose = int(getattr(args, "verbose", 0) or 0)
    set_verbosity(verbose, bool(getattr(args, "quiet", False)))
    if not verbose:  # FFmpeg's own lines ("moov atom not found") before our one-line error
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        for check in getattr(args, "run_checks", ()):
            check(args)
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"hmd {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hmd {name}: interrupted", file=sys.stderr)
        return 130
