"""Who may use the web app and which files it may open: the access token and the data folder.

No trame and no Slicer here (tested without a browser): the app plugs `token_middleware` into trame's
aiohttp server and lists and opens files only through a `DataFolder`.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from MSInstanceSaliencyLib.errors import InputError

TOKEN_COOKIE = "msis_view_token"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MODEL_SUFFIXES = (".json", ".pt", ".pth")
MAX_LISTED = 2000  # files shown in a chooser: a data folder is a case or a few, not an archive


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': only this machine's users can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to any interface


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_middleware(token: str):
    """An aiohttp middleware: every request (page, scripts, websocket) needs the token, given once as
    `?token=...` in the URL (then kept in a same-site, HTTP-only cookie, as Jupyter does) or as the cookie."""
    from aiohttp import web

    @web.middleware
    async def check_token(request, handler):
        given = request.query.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return web.Response(status=403, text="msis view: this server needs its access token: open the URL with ?token=... that "
                                                 "`msis view` printed when it started.\n")
        response = await handler(request)
        if request.query.get("token") and not request.cookies.get(TOKEN_COOKIE) and hasattr(response, "set_cookie"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    return check_token


class DataFolder:
    """The folder the page may open files from. Every path the page sends is resolved (symlinks
    followed) and refused unless it stays inside; nothing outside is listed."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root).expanduser().resolve() if root else None
        if self.root is not None and not self.root.is_dir():
            raise InputError(f"--data {root}: not a folder; give the folder that holds the scans (and models) to open from the page")

    def resolve(self, relative: str) -> Path:
        """The real path of a file or folder the page chose, or InputError if it leaves the data folder."""
        if self.root is None:
            raise InputError("no data folder: start `msis view --data DIR` to open files from the page")
        if not isinstance(relative, str) or not relative or "\x00" in relative:
            raise InputError("no file chosen")
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise InputError(f"{relative!r} is outside the data folder; choose a file under {self.root}")
        if not path.exists():
            raise InputError(f"{relative!r} does not exist in the data folder (moved or deleted?)")
        return path

    def _walk(self):
        """Relative paths under the root whose real path stays inside, sorted; at most MAX_LISTED."""
        found = []
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            dirs.sort()
            here = Path(folder)
            for name in [*dirs, *sorted(files)]:
                path = here / name
                try:
                    real = path.resolve()
                except OSError:
                    continue
                if real != self.root and self.root not in real.parents:
                    continue  # a symlink out of the data folder
                found.append(path)
                if len(found) >= MAX_LISTED:
                    return found
        return found

    def _listed(self, file_matches, folder_matches) -> list[str]:
        """Paths relative to the root of the files and folders that match, folders with a trailing '/'."""
        if self.root is None:
            return []
        out = []
        for path in self._walk():
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and file_matches(path):
                out.append(rel)
            elif path.is_dir() and folder_matches(path):
                out.append(rel + "/")
        return out

    def volumes(self) -> list[str]:
        """Volume files (NIfTI, NRRD, MetaImage) and folders with DICOM files."""
        return self._listed(lambda p: p.name.lower().endswith(VOLUME_SUFFIXES),
                            lambda p: any(f.suffix.lower() == ".dcm" for f in p.iterdir() if f.is_file()))

    def models(self) -> list[str]:
        """What `--model` takes: model.json files, checkpoints, and folders (nnU-Net results, LST-AI checkpoints)."""
        return self._listed(lambda p: p.name.lower().endswith(MODEL_SUFFIXES) and not p.name.startswith("."),
                            lambda p: (p / "plans.json").is_file() or (p / "dataset.json").is_file()
                            or any(p.glob("*.pth")) or any(p.glob("*.pt")))
