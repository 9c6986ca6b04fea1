"""Which kind of model a path holds, and refusing what cannot be loaded safely (docs/MODELS.md).

Loaded: a model.json folder (a MONAI network's state_dict), an nnU-Net v2 trained-model folder
(dataset.json, plans.json, fold_N/checkpoint_final.pth), an LST-AI 2.x checkpoint folder (or one
of its .pt files). Refused: TorchScript files and MONAI bundle configs (loading them runs code from
the file), ONNX files (no gradients, so no saliency), bare weights without a spec.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import InputError

LSTAI_STEMS = ("UNet3D_MS_final_mdlA", "UNet3D_MS_final_mdlB", "UNet3D_MS_final_mdlC")
MODELS_DOC = "docs/MODELS.md"


def detect_format(path: Path) -> tuple[str, Path]:
    """("msis" | "nnunet" | "lst-ai", the folder or file to load) or InputError saying what the path is."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model {p} does not exist; give a model folder (model.json, an nnU-Net v2 results folder, or LST-AI 2.x "
                         f"checkpoints; {MODELS_DOC})")
    if p.is_file():
        return _detect_file(p)
    if (p / "model.json").is_file():
        return "msis", p
    if (p / "plans.json").is_file() and (p / "dataset.json").is_file():
        return "nnunet", p
    _refuse_bundle(p)
    if lstai_checkpoints(p):
        return "lst-ai", p
    trained = sorted(d for d in p.iterdir() if d.is_dir() and (d / "plans.json").is_file() and (d / "dataset.json").is_file())
    if len(trained) == 1:
        return "nnunet", trained[0]
    if trained:
        raise InputError(f"{p} holds {len(trained)} nnU-Net trained models ({', '.join(d.name for d in trained)}); give the one to "
                         "use, e.g. --model " + str(trained[0]))
    if (p / "fold_0").is_dir() or p.name.startswith("fold_"):
        raise InputError(f"{p} looks like part of an nnU-Net results folder; give the folder with dataset.json, plans.json and "
                         "fold_N/ (e.g. nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres)")
    onnx = sorted(p.glob("*.onnx"))
    if onnx:
        _refuse_onnx(onnx[0])
    raise InputError(f"{p} is not a model this tool knows: it has no model.json (a MONAI network), no plans.json + dataset.json "
                     f"(nnU-Net v2) and no LST-AI 2.x .pt checkpoints ({', '.join(s + '.pt' for s in LSTAI_STEMS)}); see {MODELS_DOC}")


def _detect_file(p: Path) -> tuple[str, Path]:
    name = p.name.lower()
    if name == "model.json":
        return "msis", p.parent
    if name.endswith(".onnx"):
        _refuse_onnx(p)
    if is_torchscript(p):
        raise InputError(f"{p} is a TorchScript file; loading one runs code stored in it, so this tool does not load TorchScript. "
                         "Export the network's state_dict (torch.save(model.state_dict(), 'weights.pt')) and describe it in a "
                         f"model.json ({MODELS_DOC})")
    if name.endswith((".json", ".yaml", ".yml")):
        with open(p, "rb") as fh:  # its start only: the file may be gigabytes
            text = fh.read(200_000).decode("utf-8", errors="replace")
        if "_target_" in text or "network_def" in text:
            raise InputError(f"{p} is a MONAI bundle config; a bundle config instantiates any Python object it names, so this tool "
                             "does not run bundles. Take the bundle's network class and arguments and its weights (models/model.pt) "
                             f"into a model.json folder ({MODELS_DOC})")
        raise InputError(f"{p} is not a model; give the folder that holds model.json, or an nnU-Net/LST-AI folder ({MODELS_DOC})")
    if name.endswith((".pt", ".pth", ".ckpt", ".bin")):
        if name == "checkpoint_final.pth" or name == "checkpoint_best.pth":
            raise InputError(f"{p} is one nnU-Net fold's checkpoint; give the trained-model folder above it (the one with "
                             "dataset.json, plans.json and fold_N/), and --folds to choose folds")
        if is_lstai_checkpoint(p):
            return "lst-ai", p
        raise InputError(f"{p} is a weights file without a description of its network; put it in a folder with a model.json that "
                         f"names the MONAI network class, its arguments and the input channels ({MODELS_DOC})")
    raise InputError(f"{p} is not a model this tool knows; see {MODELS_DOC}")


def is_torchscript(p: Path) -> bool:
    """A torch.jit.save file: a zip archive with the module's code (torch.save archives hold data only)."""
    if not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def _refuse_bundle(p: Path) -> None:
    configs = p / "configs"
    if configs.is_dir() and any((configs / f).is_file() for f in ("metadata.json", "inference.json", "inference.yaml", "train.json")):
        raise InputError(f"{p} is a MONAI bundle; a bundle config instantiates any Python object it names, so this tool does not run "
                         "bundles. Describe its network (configs/inference.json's network_def) in a model.json with the bundle's "
                         f"models/model.pt as weights ({MODELS_DOC})")


def _refuse_onnx(p: Path) -> None:
    raise InputError(f"{p} is an ONNX model: saliency needs the network's gradients, which ONNX Runtime does not give. LST-AI 1.x "
                     "ensembles: use LST-AI 2.x's .pt checkpoints (its download, or `python -m lst_ai.weights --onnx-dir ... "
                     f"--out-dir ...`); other networks: their PyTorch weights with a model.json ({MODELS_DOC})")


def lstai_checkpoints(folder: Path) -> list[Path]:
    """LST-AI 2.x member checkpoints in a folder: the ensemble's files by name, else any .pt in its format."""
    named = [folder / f"{s}.pt" for s in LSTAI_STEMS if (folder / f"{s}.pt").is_file()]
    if named:
        return named
    return [f for f in sorted(folder.glob("*.pt")) if is_lstai_checkpoint(f)]


def is_lstai_checkpoint(p: Path) -> bool:
    """A dict with 'config' (the network's arguments) and 'state_dict', as lst_ai/weights.py writes."""
    import torch

    if not p.is_file() or is_torchscript(p):
        return False
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one holding more than tensors: not LST-AI's format
        return False
    return isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("state_dict"), dict) and \
        "n_filters" in ckpt["config"]
