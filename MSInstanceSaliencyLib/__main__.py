import os
import sys

try:
    from .errors import swallowed_interrupts_redelivered

    with swallowed_interrupts_redelivered():  # from the first import on (main() alone would start later)
        from .cli import main

        code = main()
except KeyboardInterrupt:  # Ctrl-C while importing, or just before main() handles it: one line, as main() says it
    print("msis: interrupted", file=sys.stderr)
    code = 130

if code == 130:
    # Interrupted (or cancelled) and already reported in one line. Exit with 130 as promised: after a
    # Ctrl-C that landed inside an extension's own Python call during an import (torch does that),
    # CPython would otherwise end the process by SIGINT at shutdown despite the code given here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
sys.exit(code)
