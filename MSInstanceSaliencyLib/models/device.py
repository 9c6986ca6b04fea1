"""The torch device (auto, cpu or cuda) and the CPU threads torch uses."""

from __future__ import annotations

import os


from ..errors import InputError


def env_threads(leave_free: int = 0) -> None:
    """Use all cores but `leave_free` for torch on CPU (torch defaults may be lower inside some
    launchers), or MSIS_THREADS of them (to run several jobs side by side). The Slicer worker leaves one
    to Slicer: with every core busy its own user interface turns sluggish."""
    import torch

    n = int(os.environ.get("MSIS_THREADS") or max(1, (os.cpu_count() or 1) - leave_free))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def resolve_device(device: str = "auto"):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device != "cpu" and not str(device).startswith("cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)
