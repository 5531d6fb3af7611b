"""Command-line plumbing shared by every stage.

Each stage keeps a ``COMMANDS`` dict (name → :class:`Command`) in its ``cli.py``; the target
module is imported only when its command runs, so ``--help`` stays instant and never loads
torch, ray or open_clip. ``qcap`` (package ``qcap``) merges the stages' dicts. Every target is
``main(argv: list[str], prog: str) -> int``. A command with sub-commands keeps a table of its
own, ``{name: Command(...)}``, and its ``main`` hands it to :func:`dispatch`, the same code that
dispatches the top-level commands (listing, ``--help``, one-line unknown-name error).

"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    help: str  # one line shown in listings
    target: str  # "package.module:function", a main(argv: list[str], prog: str) -> int


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, exit status 2."""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not the one current when
    logging was set up: commands run one after another in one process (tests, notebooks) swap
    stderr, and a handler bound to the first one would write to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always wins
        return


OWN_LOGGERS = ("qcap", "base", "curate", "world", "captioning", "train", "finetune", "demo", "__main__")


def setup_logging(level: str | None = None) -> None:
    """qcap's own loggers at ``QCAP_LOG_LEVEL`` (INFO); everything else at WARNING unless DEBUG
    is asked for — open_clip logs every checkpoint lookup at INFO on the root logger, which
    buried a command's one-line error under a dozen lines of its chatter."""
    level = (level or os.environ.get("QCAP_LOG_LEVEL", "INFO")).upper()
    root = logging.getLogger()
    numeric = logging.getLevelName(level)
    if not isinstance(numeric, int):
        numeric, level = logging.INFO, "INFO"
    root.setLevel(min(numeric, logging.DEBUG) if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
    _repoint_closed_streams()


def _repoint_closed_streams() -> None:
    """Point every library handler whose stream has been closed at the current ``sys.stderr``.

    A library that sets up its own console handler (Ray Data does, on its first dataset) binds
    it to the stderr of that moment; when commands run one after another in one process
    (notebooks, tests) that stream may be closed by the time the next command logs, and every
    record then prints a "--- Logging error ---" traceback instead of its line."""
    loggers = [logging.getLogger()] + [obj for obj in logging.Logger.manager.loggerDict.values()
                                       if isinstance(obj, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and getattr(handler.stream, "closed", False):
                with handler.lock or contextlib.nullcontext():  # not setStream: it flushes the closed stream
                    handler.stream = sys.stderr


def _listing(prog: str, commands: Mapping[str, Command], description: str, noun: str = "command") -> str:
    width = max((len(name) for name in commands), default=0)
    lines = [f"usage: {prog} <{noun}> [options]", "", description, "", f"{noun}s:"]
    lines += [f"  {name.ljust(width)}  {cmd.help}" for name, cmd in commands.items()]
    lines += ["", f"Run '{prog} <{noun}> --help' for the options of one {noun}."]
    return "\n".join(lines)


def _unknown(prog: str, name: str, commands: Mapping[str, Command], noun: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(commands), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    choices = f"; choose from {', '.join(commands)}" if len(commands) <= 8 else f"; run '{prog} --help' for the list"
    return f"unknown {noun} {name!r}{hint}{choices}"


def dispatch(prog: str, commands: Mapping[str, Command], argv: Sequence[str] | None, description: str,
             *, noun: str = "command") -> int:
    """Run ``argv[0]``'s target with the rest of argv under ``prog NAME`` (through :func:`run_guarded`);
    print the listing for -h/--help/nothing; an unknown name is one line, exit status 2.

    The one sub-command mechanism: ``qcap`` dispatches the stages' commands with it, and a command
    with sub-commands (``qcap filter basic``, ``qcap uids intersect``, ``qcap shards verify``,
    ``qcap finetune seg``) is a ``main(argv, prog)`` that dispatches its own table of
    :class:`Command` entries with it (``noun`` names them in the listing and errors: "filter").
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_listing(prog, commands, description, noun))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: error: {_unknown(prog, name, commands, noun)}", file=sys.stderr)
        return 2
    module_name, func_name = commands[name].target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return run_guarded(func, rest, f"{prog} {name}")


def run_guarded(func, argv: list[str], prog: str) -> int:
    """Call a command; contract violations become one clear line and exit status 2.

    Anything else that escapes a command is a bug in qcap (every bad input has its own status or
    error): it is still one line, naming itself an internal error (exit 1), so a user never gets
    a traceback; ``QCAP_TRACEBACK=1`` re-raises it for whoever fixes it.
    """
    from base.config import ConfigError
    from base.shards import ShardError

    setup_logging()
    try:
        code = func(argv, prog=prog)
    except (ShardError, ConfigError, UsageError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qcap shards info ... | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):  # point stdout at /dev/null so the interpreter's final flush stays quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print(f"{prog}: error: out of memory; lower --batch-size/--num-workers or give the job more memory", file=sys.stderr)
        return 1
    except Exception as err:  # the last line of defence: every known bad input has its own status or error
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{prog}: internal error: {type(err).__name__}: {_one_line(err)} "
              f"(a bug in qcap, not in your input; {TRACEBACK_ENV}=1 shows where)", file=sys.stderr)
        return 1
    return int(code or 0)


TRACEBACK_ENV = "QCAP_TRACEBACK"
INTERNAL_ERROR = "internal error"  # what the last-resort line says; the hostile-input tests fail on it


def _one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
