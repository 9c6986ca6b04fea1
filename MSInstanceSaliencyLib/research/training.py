"""Training a segmentation model on phantoms (the bundled demo model is made with this).

`msis train --config demo --out DIR` trains the demo U-Net; `--config paper` the journal paper's
U-Net (same command, more compute). Training phantoms come from shared patients 01-16, validation
phantoms (see evaluation.validate_model) from patients 17-22, with seeds that never coincide.
Patches are sampled around lesions, around lesion mimics and at random brain positions; the loss is
normalised Dice plus blob loss (losses.py), plus voxel-wise cross-entropy where the configuration
asks for it. The demo configuration also trains on context-restoration images labelled background
(the journal paper's Discussion): a lesion with at most a few mm of its surroundings, the rest of the
input at the image mean, is not a lesion. Everything is seeded.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.outputs import atomic_write
from ..models.base import DEMO_UNET_ARGS, ModelSpec, PAPER_UNET_ARGS
from ..models.monai import build_network, save_model
from ..progress import ProgressBar

TRAIN_PATIENTS = tuple(range(1, 17))
VAL_PATIENTS = tuple(range(17, 23))


def training_seed(patient: int, k: int) -> int:
    return 100 * patient + k


def validation_seed(patient: int, k: int = 0) -> int:
    return 10_000 + 100 * patient + k


CONFIGS = {
    # context: share of patches that are context-restoration images (lesion + 0..context_mm of its
    # surroundings, label background); ce: weight of the cross-entropy term (0 = the paper's loss only);
    # transplant: share of patches outside the brain with a pasted lesion + 0..transplant_mm, label
    # background; contrast: strength of the gain/offset/ramp/noise augmentation (0 = mild scaling only).
    # The last two were tried for model 3 and not kept (docs/MODEL_CARD.md, "Probes"): off for demo.
    "demo": dict(network_args=DEMO_UNET_ARGS, roi_size=[64, 64, 64], patch=64, batch=4, iterations=6000, lr=2e-3,
                 context=0.15, context_mm=5, ce=1.0, transplant=0.0, transplant_mm=0, contrast=0.0),
    "paper": dict(network_args=PAPER_UNET_ARGS, roi_size=[96, 96, 96], patch=96, batch=2, iterations=20000, lr=1e-3,
                  context=0.0, context_mm=0, ce=0.0, transplant=0.0, transplant_mm=0, contrast=0.0),
}


@dataclass
class TrainingCase:
    image: np.ndarray  # (C, X, Y, Z) float16, prepared like at inference
    instances: np.ndarray  # (X, Y, Z) int16 ground-truth instances
    lesion_voxels: np.ndarray  # (n, 3)
    mimic_voxels: np.ndarray
    brain_voxels: np.ndarray


def phantom_case(patient: int, seed: int, spec: ModelSpec, cache_dir: Path | None = None) -> TrainingCase:
    """A phantom prepared exactly as inference prepares inputs, cached on disk."""
    from scipy import ndimage

    from .phantom import PHANTOM_VERSION, make_phantom
    from ..models.preprocessing import prepare_case
    from ..io.volumes import array_from_image

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"p{patient:02d}_s{seed}_{spec.normalization}_v{PHANTOM_VERSION}.npz"
        if cache.is_file():
            z = np.load(cache)
            return TrainingCase(z["image"], z["instances"], z["lesion"], z["mimic"], z["brain"])
    ph = make_phantom(seed, patient=patient)
    prepared = prepare_case(ph.flair, ph.mprage, spec)
    gt = array_from_image(ph.lesions, np.uint8) > 0
    inst, _ = ndimage.label(gt, structure=ndimage.generate_binary_structure(3, 2))
    mimic = array_from_image(ph.mimics, np.uint8) > 0
    brain = array_from_image(ph.brain_mask, np.uint8) > 0
    case = TrainingCase(
        prepared.image.astype(np.float16),
        inst.astype(np.int16),
        np.argwhere(gt).astype(np.int16),
        np.argwhere(mimic).astype(np.int16),
        np.argwhere(brain)[::7].astype(np.int16),
    )
    if cache is not None:  # whole or not at all: a truncated cache would be read back by the next run
        atomic_write(cache, lambda tmp: np.savez(tmp, image=case.image, instances=case.instances, lesion=case.lesion_voxels,
                                                 mimic=case.mimic_voxels, brain=case.brain_voxels))
    return case


def outside_brain_voxels(case: TrainingCase, margin: int = 3, step: int = 11) -> np.ndarray:
    """Voxels at least `margin` voxels outside the brain (head tissue and the air around it), every step-th.

    The brain mask is rebuilt from the cached every-7th brain voxel (raster order: a 1x1x13 dilation
    closes the gaps, also those of up to 6 voxels at the ends of a row) and then widened by `margin`.
    """
    from scipy import ndimage

    brain = np.zeros(case.instances.shape, bool)
    brain[tuple(case.brain_voxels.T.astype(int))] = True
    brain = ndimage.binary_dilation(brain, structure=np.ones((1, 1, 13), bool))
    brain = ndimage.binary_dilation(brain, iterations=margin)
    return np.argwhere(~brain)[::step].astype(np.int16)


def _crop(volume: np.ndarray, lo, size: int) -> np.ndarray:
    """volume[..., lo:lo+size] on the last three axes, zero-padded where it leaves the volume."""
    shape = np.array(volume.shape[-3:])
    a, b = np.clip(lo, 0, shape), np.clip(np.asarray(lo) + size, 0, shape)
    out = np.zeros(volume.shape[:-3] + (size,) * 3, volume.dtype)
    dst = tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))
    out[(Ellipsis,) + dst] = volume[(Ellipsis,) + tuple(slice(x, y) for x, y in zip(a, b))]
    return out


def _contrast_augmentation(rng, img: np.ndarray, strength: float) -> np.ndarray:
    """Per channel: gain, offset, a linear bias ramp across the patch and Gaussian noise (z units).

    strength 0 is the mild scaling of model 2.0.0; at 1 the absolute intensity of a patch says little,
    only how a voxel differs from its surroundings does (lesion and surroundings move together).
    """
    c = img.shape[0]
    gain = rng.uniform(0.9 - 0.15 * strength, 1.1 + 0.25 * strength, size=(c, 1, 1, 1))
    offset = rng.uniform(-0.1 - 0.4 * strength, 0.1 + 0.4 * strength, size=(c, 1, 1, 1))
    img = img * gain + offset
    if strength:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        ramp = sum(d * np.linspace(-0.5, 0.5, n)[tuple(slice(None) if i == k else None for i in range(3))]
                   for k, (d, n) in enumerate(zip(direction, img.shape[1:])))
        img = img + rng.uniform(-0.3, 0.3, size=(c, 1, 1, 1)) * strength * ramp[None]
        img = img + rng.normal(0.0, rng.uniform(0, 0.15 * strength), size=img.shape)
    return img


def sample_patch(rng: np.random.Generator, case: TrainingCase, patch: int, p_lesion=0.5, p_mimic=0.2, p_context=0.0, context_mm=5,
                 p_transplant=0.0, transplant_mm=3, contrast=0.0, outside=None):
    """One (image, instances) patch centred on a lesion, a mimic or a random brain voxel, randomly flipped.

    With probability p_context (taken from the lesion share) it is a context-restoration image: one
    lesion and its 0..context_mm 18-connected dilation steps kept, every other input voxel set to 0 (the
    z-scored image's mean, as in the contextual-information experiment), labelled all background.
    With probability p_transplant (taken from the random-brain share) it is centred outside the brain
    (`outside`: voxels from outside_brain_voxels) with one of the case's lesions and 0..transplant_mm of
    its surroundings pasted in, labelled background: a bright spot is a lesion only inside the brain.
    `contrast` is the strength of _contrast_augmentation.
    """
    from ..segmentation.instances import dilation_steps

    u = rng.random()
    pool = case.brain_voxels
    if u < p_lesion and len(case.lesion_voxels):
        pool = case.lesion_voxels
    elif u < p_lesion + p_mimic and len(case.mimic_voxels):
        pool = case.mimic_voxels
    context = u < p_context and len(case.lesion_voxels) > 0
    if context:
        pool = case.lesion_voxels
    transplant = u >= 1.0 - p_transplant and outside is not None and len(outside) and len(case.lesion_voxels)
    if transplant:
        pool = outside
    voxel = pool[rng.integers(len(pool))].astype(int)
    centre = voxel + rng.integers(-patch // 4, patch // 4 + 1, size=3)
    shape = np.array(case.instances.shape)
    lo = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
    sl = tuple(slice(a, a + patch) for a in lo)
    img = case.image[(slice(None),) + sl].astype(np.float32)
    inst = case.instances[sl].astype(np.int64)
    pad = [(0, patch - s) for s in inst.shape]
    if any(p[1] for p in pad):
        img = np.pad(img, [(0, 0)] + pad)
        inst = np.pad(inst, pad)
    if transplant:
        size = min(32, patch)
        src = case.lesion_voxels[rng.integers(len(case.lesion_voxels))].astype(int)
        src_lo = src - size // 2
        src_inst = _crop(case.instances, src_lo, size)
        piece = dilation_steps(src_inst == case.instances[tuple(src)], int(rng.integers(0, transplant_mm + 1)))[-1]
        src_img = _crop(case.image, src_lo, size).astype(np.float32)
        at = np.clip(voxel - lo - size // 2, 0, patch - size)
        dst = tuple(slice(a, a + size) for a in at)
        img[(slice(None),) + dst][:, piece] = src_img[:, piece]
        inst[dst][piece] = 0
    if rng.random() < 0.5:  # left-right flip
        img, inst = img[:, ::-1], inst[::-1]
    img = _contrast_augmentation(rng, img, contrast)
    if context:  # after the augmentation, so the removed context is exactly 0 as in the experiment
        keep = dilation_steps(inst == case.instances[tuple(voxel)], int(rng.integers(0, context_mm + 1)))[-1]
        img = img * keep
        inst = np.zeros_like(inst)
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(inst)


def _draw_patch(rng, cases, outside, patch, cfg):
    k = rng.integers(len(cases))
    return sample_patch(rng, cases[k], patch, p_context=cfg["context"], context_mm=cfg["context_mm"], p_transplant=cfg["transplant"],
                        transplant_mm=cfg["transplant_mm"], contrast=cfg["contrast"], outside=outside[k])


def train(
    out_dir,
    config: str = "demo",
    *,
    patients=TRAIN_PATIENTS,
    phantoms_per_patient: int = 2,
    iterations: int | None = None,
    batch: int | None = None,
    patch: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    cache_dir=".cache/phantoms",
    device: str = "auto",
    log=print,
):
    """Train a model and write it as a model folder; returns the output path."""
    import torch

    from .losses import ndsc_blob_loss
    from ..models.device import resolve_device

    cfg = dict(CONFIGS[config])
    ce_weight = cfg["ce"]
    iterations = iterations or cfg["iterations"]
    batch = batch or cfg["batch"]
    patch = patch or cfg["patch"]
    lr = lr or cfg["lr"]
    dev = resolve_device(device)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rng = np.random.default_rng(seed)

    spec = ModelSpec(
        network_args=dict(cfg["network_args"]),
        roi_size=list(cfg["roi_size"]),
        name=f"msis-{config}-unet",
        version="2.0.0",  # 2: head phantoms, context-restoration patches
        description=f"MONAI UNet ({config} configuration) trained on MSInstanceSaliency phantoms. Demonstration only, not for clinical use.",
    )
    cases = []
    pairs = [(p, training_seed(p, k)) for p in patients for k in range(phantoms_per_patient)]
    bar = ProgressBar(len(pairs), "phantoms")
    for i, (p, s) in enumerate(pairs):
        cases.append(phantom_case(p, s, spec, Path(cache_dir) if cache_dir else None))
        bar(i + 1, len(pairs))

    outside = [outside_brain_voxels(c) if cfg["transplant"] else None for c in cases]
    net = build_network(spec).to(dev)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * min(it, iterations) / iterations)) * 0.99 + 0.01)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = []
    t0 = time.time()
    running = None
    for it in range(1, iterations + 1):
        xs, ys = zip(*(_draw_patch(rng, cases, outside, patch, cfg) for _ in range(batch)))
        x = torch.from_numpy(np.stack(xs)).to(dev)
        y = torch.from_numpy(np.stack(ys)).to(dev)
        logits = net(x)
        loss = ndsc_blob_loss(logits, y)
        if ce_weight:  # Dice terms give almost no gradient on patches without lesions; CE does
            loss = loss + ce_weight * torch.nn.functional.cross_entropy(logits, (y > 0).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if it % 50 == 0 or it == iterations:
            history.append({"iteration": it, "loss": round(running, 5), "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)})
            log(f"iter {it}/{iterations} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
        if it % 1000 == 0 or it == iterations:
            spec.training = _training_record(config, patients, phantoms_per_patient, iterations, batch, patch, lr, seed, time.time() - t0, it, dev, cfg)
            save_model(net, spec, out)
    atomic_write(out / "training_log.json", (json.dumps(history, indent=1) + "\n").encode("utf-8"))
    plot_training_log(out / "training_log.json", out / "training_curve.png")
    return out


def plot_training_log(log_json, png):
    """The smoothed training loss and the learning rate over iterations, from training_log.json."""
    from ..saliency.figures import pyplot, save_figure

    plt = pyplot()

    rows = json.loads(Path(log_json).read_text())
    it = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    ax.plot(it, [r["loss"] for r in rows], color="tab:red", label="loss (exponential moving average, 0.95)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(it, [r["lr"] for r in rows], color="tab:gray", ls="--", label="learning rate")
    ax2.set_ylabel("learning rate")
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    ax.set_title(f"training: {it[-1]} iterations, {rows[-1]['seconds']:.0f} s", fontsize=9)
    save_figure(fig, png, dpi=100)
    return Path(png)


def _training_record(config, patients, per_patient, iterations, batch, patch, lr, seed, seconds, done, dev, cfg):
    import torch

    from .phantom import PHANTOM_VERSION

    return {
        "config": config,
        "patients": list(patients),
        "phantom_seeds": "100*patient + k, k < phantoms_per_patient",
        "phantoms_per_patient": per_patient,
        "iterations": iterations,
        "iterations_done": done,
        "batch": batch,
        "patch": patch,
        "lr": lr,
        "seed": seed,
        "loss": "2 * normalised Dice (r=0.001) + blob loss" + (f" + {cfg['ce']} * cross-entropy" if cfg["ce"] else ""),
        "context_restoration": {"share": cfg["context"], "max_mm": cfg["context_mm"], "label": "background"} if cfg["context"] else None,
        "transplant": {"share": cfg["transplant"], "max_mm": cfg["transplant_mm"], "label": "background"} if cfg["transplant"] else None,
        "contrast_augmentation": cfg["contrast"],
        "phantom_version": PHANTOM_VERSION,
        "seconds": round(seconds, 1),
        "device": str(dev),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
