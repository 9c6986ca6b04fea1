"""Command line: `msis <command>` or `python -m MSInstanceSaliencyLib <command>`.

Bad input ends with one line `msis: error: ...` and exit code 2; nothing the user gave is modified.
Set MSIS_DEBUG=1 to see tracebacks of unexpected errors.

parser.py holds every command's arguments, checks.py what argparse cannot check alone; the commands are in
workflow.py (segment, explain, demo, evaluate), classifier.py (features, train-classifier,
evaluate-classifier), research.py (phantom, context, sanity, stats, reproduce, train, validate-model) and
cohort.py, and view.py (the browser face). Each imports its heavy libraries when it runs, so that `msis --help` starts light.
"""

from __future__ import annotations

import functools
import os
import sys

from ..errors import Cancelled, InputError, interrupted, swallowed_interrupts_redelivered
from .checks import _check_args
from .classifier import cmd_evaluate_classifier, cmd_features, cmd_train_classifier
from .cohort import cmd_cohort
from .parser import N_PATIENTS, SCHEDULER_TIMEOUT, _parse_patients, build_parser
from .view import cmd_view
from .research import cmd_context, cmd_phantom, cmd_reproduce, cmd_sanity, cmd_stats, cmd_train, cmd_validate_model
from .workflow import _print_tp_probability_by_kind, cmd_demo, cmd_evaluate, cmd_explain, cmd_segment

# what code and tests import from MSInstanceSaliencyLib.cli
__all__ = ["COMMANDS", "N_PATIENTS", "SCHEDULER_TIMEOUT", "_check_args", "_parse_patients", "_print_tp_probability_by_kind",
           "build_parser", "main"]


def main(argv=None) -> int:
    with swallowed_interrupts_redelivered():
        return _main(argv)


def _main(argv) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"msis: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    except Cancelled:
        print("msis: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("msis: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line unless debugging
        if interrupted():  # a Ctrl-C that a library turned into its own error (an ImportError mid-import)
            print("msis: interrupted", file=sys.stderr)
            return 130
        if os.environ.get("MSIS_DEBUG"):
            raise
        print(f"msis: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set MSIS_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return 1


COMMANDS = {
    "segment": cmd_segment, "explain": cmd_explain, "view": cmd_view, "demo": cmd_demo, "phantom": cmd_phantom, "evaluate": cmd_evaluate,
    "train": cmd_train, "validate-model": cmd_validate_model, "features": cmd_features,
    "train-classifier": cmd_train_classifier, "evaluate-classifier": cmd_evaluate_classifier,
    # reproduce runs the experiments through main, handed over here: research.py importing this package back would be a cycle
    "context": cmd_context, "sanity": cmd_sanity, "stats": cmd_stats, "reproduce": functools.partial(cmd_reproduce, run=main),
    "cohort": cmd_cohort,
}
