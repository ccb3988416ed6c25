"""Ctrl-C while the console script is still importing torch/transformers: one line and exit code 130, no traceback.

Imported first by the package; active only for `optimum-isoprune` / `python -m optimum_isoprune`, and only until
`cli.main` hands SIGINT back to Python (from then on `main` turns KeyboardInterrupt into the same line).
"""

import os
import signal
import sys


def _interrupted(signum, frame):  # pragma: no cover - runs in a child process in the tests
    sys.stderr.write("optimum-isoprune: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def restore_default_handler() -> None:
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_argv0 = sys.argv[0] if sys.argv else ""
_orig = list(getattr(sys, "orig_argv", []))
_as_module = _argv0 == "-m" and any(a == "-m" and b == "optimum_isoprune" for a, b in zip(_orig, _orig[1:]))
if (_as_module or os.path.basename(_argv0) == "optimum-isoprune") and signal.getsignal(
    signal.SIGINT
) is signal.default_int_handler:
    try:
        signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread
        pass
