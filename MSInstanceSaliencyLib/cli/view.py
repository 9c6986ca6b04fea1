"""`msis view`: checks the arguments, then serves the web face (MSInstanceSaliency/MSInstanceSaliencyWeb, which
sits beside the Slicer module because it drives the module's MRML layer; it is not part of the Lib)."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from ..errors import InputError

MODULE_DIR = Path(__file__).resolve().parents[2] / "MSInstanceSaliency"  # the Slicer module's folder in a source checkout
WEB_HINT = "bash scripts/setup_env.sh (it installs the web extra: pip install -e '.[web]')"


def _check_view_args(args):
    from ..io.volumes import check_distinct_inputs, read_image

    if args.mprage and not args.flair:
        raise InputError("give the FLAIR first: msis view FLAIR [MPRAGE]")
    check_distinct_inputs(args.flair or None, args.mprage or None)
    images = [read_image(path, what) if path else None for path, what in ((args.flair, "FLAIR"), (args.mprage, "MPRAGE"))]
    check_distinct_inputs(*images)  # a bad or duplicate file fails now, in one line, not in the page
    if args.model and not Path(args.model).exists():
        raise InputError(f"--model {args.model} does not exist")
    if not (MODULE_DIR / "MSInstanceSaliencyWeb").is_dir():
        raise InputError(f"msis view runs from a source checkout (it needs {MODULE_DIR / 'MSInstanceSaliencyWeb'})")
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    from MSInstanceSaliencyWeb.access import DataFolder  # stdlib only: trame and slicer-core are not loaded yet

    DataFolder(args.data)  # the page's own check of --data, now
    _check_port(args.host, args.port)
    missing = [m for m in ("trame_slicer", "trame_vuetify", "slicer") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"msis view needs trame-slicer, which is not installed here ({', '.join(missing)} missing): {WEB_HINT}")


def _check_port(host, port):
    """The address is this machine's and the port is free, before the scans and the model are loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InputError(f"--host {host}: not an address of this machine (use 127.0.0.1, or 0.0.0.0 for every interface)") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port (0: any free one)") from None


def cmd_view(args) -> int:
    _check_view_args(args)  # also puts the web face's folder on sys.path
    from MSInstanceSaliencyWeb.access import is_loopback

    token_required = not is_loopback(args.host) and not args.no_token
    if not is_loopback(args.host) and args.no_token:
        print(f"msis view: WARNING: serving {args.host} without an access token (--no-token): anyone who reaches port "
              f"{args.port} can use this server and open the files under --data", file=sys.stderr)
    from MSInstanceSaliencyWeb.server import serve  # noqa: E402  (trame and slicer-core load only now)

    demo = None
    if not args.flair:
        from ..research.phantom import make_phantom
        from .common import _phantom_voxel_size

        voxel_size = _phantom_voxel_size(note=True)
        print(f"msis view: demo phantom (lesions of patient {args.patient}, {voxel_size:g} mm voxels) ...", file=sys.stderr)
        phantom = make_phantom(2024, patient=args.patient, voxel_size=voxel_size)
        demo = (phantom.flair, phantom.mprage)
    with tempfile.TemporaryDirectory(prefix="msis-view-") as results:
        return serve(flair=args.flair, mprage=args.mprage, model=args.model or "", device=args.device, data=args.data, demo=demo,
                     host=args.host, port=args.port, token_required=token_required, results_dir=os.path.join(results, "results"))
