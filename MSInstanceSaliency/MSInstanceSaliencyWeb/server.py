"""Start the web app's server: rendering set up for a machine without a display, the access token, the URL."""

from __future__ import annotations

import os
import sys

from .access import new_token, token_middleware


def serve(*, flair=None, mprage=None, model="", device="auto", data=None, demo=None, host="127.0.0.1", port=8080,
          token_required=False, results_dir=None) -> int:
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        # a headless server: straight to EGL, instead of VTK's failed X connection and its fallback
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    sys.argv = sys.argv[:1]  # trame parses sys.argv itself: msis has parsed it already
    from vtkmodules.vtkCommonCore import vtkLogger, vtkObject

    # VTK's deprecation warnings about trame-slicer's interactors say nothing to a user; errors still show
    vtkObject.GlobalWarningDisplayOff()
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_ERROR)
    from trame.app import get_server

    from .app import MSISViewApp

    server = get_server("msis-view", client_type="vue3")
    token = new_token() if token_required else None
    if token:
        # every request (page, scripts, websocket) is checked; added before aiohttp freezes its middlewares at start
        server.controller.on_server_bind.add(lambda wslink_server: wslink_server.app.middlewares.append(token_middleware(token)))
    app = MSISViewApp(server, flair=flair, mprage=mprage, model=model, data=data, demo=demo, results_dir=results_dir)
    app.state.device = device

    def ready(**_):
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{server.port}/" + (f"?token={token}" if token else "")
        print(f"msis view: serving on {host}:{server.port}; open {url}", file=sys.stderr, flush=True)

    server.controller.on_server_ready.add(ready)
    server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0)
    return 0
