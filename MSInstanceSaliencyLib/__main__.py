import os
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: one line, as main() says it later
    print("msis: interrupted", file=sys.stderr)
    sys.exit(130)

code = main()
if code == 130:
    # Interrupted (or cancelled) and already reported in one line. Exit with 130 as promised: after a
    # Ctrl-C that landed inside an extension's own Python call during an import (torch does that),
    # CPython would otherwise end the process by SIGINT at shutdown despite the code given here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
sys.exit(code)
