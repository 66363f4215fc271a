"""One set of exit codes for every command (covidct-train, -export, -batch, -evaluate, -report, -demo).

Each command's ``main`` is wrapped by :func:`command`: an error that names its code (``CommandError``)
prints its message and exits with it; Ctrl-C and SIGTERM exit 130; any other exception is a bug,
printed with its traceback and exit ``INTERNAL`` (70), so that a crash never looks like a run that
finished with error rows (1). Click's own usage errors (an unknown option) exit 2, as ``BAD_INPUT``.
"""

from __future__ import annotations

import faulthandler
import functools
import signal
import sys
import traceback
from enum import IntEnum


class Exit(IntEnum):
    """Exit codes: the README's table."""

    OK = 0                 # done: every file ok or skipped (batch, evaluate), the model written (train, export)
    FILE_ERRORS = 1        # done, but some files are error rows (batch) or unreadable (evaluate, demo)
    BAD_INPUT = 2          # nothing done: bad options or input, no model, broken contract, OUT in use, nothing found
    OUTPUT_FAILED = 3      # stopped: an output could not be written (disk full); what was written before is intact
    VALIDATION_FAILED = 4  # covidct-export: the ONNX model disagrees with Keras (or INT8 failed its checks); not written
    INTERNAL = 70          # a bug (an unexpected exception, traceback printed): never 1
    INTERRUPTED = 130      # Ctrl-C or SIGTERM: what was written is kept; rerun to resume


class CommandError(Exception):
    """An error a command reports in one line and exits with ``code``."""

    def __init__(self, message: str, code: Exit = Exit.BAD_INPUT):
        super().__init__(message)
        self.code = Exit(code)


class RunError(CommandError):
    """A run that cannot start (bad options, no model, broken contract, Ray unreachable, OUT_DIR in use): exit 2,
    before any work."""

    def __init__(self, message: str):
        super().__init__(message, Exit.BAD_INPUT)


def _terminated(signum, frame):
    raise KeyboardInterrupt


def command(name: str, interrupted: str = "interrupted; what was written is kept"):
    """Decorator for a command's ``main`` (inside ``@click.command``): the exit-code table above."""
    def wrap(fn):
        @functools.wraps(fn)
        def main(*args, **kwargs):
            signal.signal(signal.SIGTERM, _terminated)  # schedulers stop jobs with SIGTERM: end like Ctrl-C
            if sys.__stderr__ is not None:  # a crash in native code (exit -11) leaves the Python stacks on stderr
                faulthandler.enable(file=sys.__stderr__, all_threads=True)
            try:
                code = fn(*args, **kwargs)
            except CommandError as e:
                print(f"{name}: error: {e}", file=sys.stderr)
                sys.exit(e.code)
            except KeyboardInterrupt:
                print(f"{name}: {interrupted}", file=sys.stderr)
                sys.exit(Exit.INTERRUPTED)
            except SystemExit:
                raise
            except Exception:  # noqa: BLE001  a bug: say so, with its traceback, and never exit 1
                traceback.print_exc()
                print(f"{name}: internal error (a bug, not a problem with the input): please report it with the "
                      f"traceback above; exit {int(Exit.INTERNAL)}", file=sys.stderr)
                sys.exit(Exit.INTERNAL)
            sys.exit(int(code) if code is not None else Exit.OK)
        return main
    return wrap


__all__ = ["Exit", "CommandError", "RunError", "command"]
