"""Instance-level SmoothGrad (mean and max-with-sign, Eqs. 2-3).

METHOD.md is the specification. The costly part is Eq. 3: for every noisy copy, the gradient of
each lesion voxel's logit with respect to the input, reduced voxel-wise by the signed maximum of
absolute values. Instead of one `torch.autograd.grad` per voxel (the authors' scripts), each noisy
copy gets one forward pass, and the |Ω| vector-Jacobian products go through the backward graph in
chunks (`is_grads_batched=True`, i.e. vmap), reduced chunk by chunk so the Jacobian is never held.

Arrays: `image` is (C, X, Y, Z) float32 prepared for the network; `omega` is a boolean (X, Y, Z).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..progress import report
from .common import (CPU_PASS_ACTIVATION_BYTES, MAX_COPIES_PER_PASS, _activation_bytes, _autocast, _available_bytes, _check_inputs, _chunk_fitting, _divisor,
                     _halved_after_oom, _is_oom, _lesion_head, _network_and_spec, check_backward_fits, frozen)
from .context import ContextBox, DEFAULT_ROI, _crop_pad, _uncrop, context_box


# ----------------------------------------------------------------------------- SmoothGrad

def noise_sigma(image: np.ndarray, sigma: float, sigma_mode: str, flair_channel: int = 0) -> float:
    """σ of the SmoothGrad noise: sigma × (max − min) of the FLAIR channel ('range'), or sigma itself."""
    if sigma < 0:
        raise InputError(f"sigma must be >= 0, got {sigma}")
    if sigma_mode == "range":
        ch = image[flair_channel]
        return float(sigma * (float(ch.max()) - float(ch.min())))
    if sigma_mode == "absolute":
        return float(sigma)
    raise InputError(f"sigma_mode must be 'range' or 'absolute', got {sigma_mode!r}")


def noise_stream(shape, sd: float, seed: int):
    """The SmoothGrad noise: one (C, X, Y, Z) draw per noisy copy from a CPU generator seeded with `seed`."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    while True:
        yield torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * sd


def omega_sample(n_omega: int, max_voxels: int | None, seed: int) -> np.ndarray:
    """Positions (ascending, so ties resolve as over all of Ω) of the Ω voxels that the max runs over:
    all of them, or a random subset of `max_voxels` drawn from a generator seeded with `seed`."""
    if max_voxels is not None and int(max_voxels) < 1:
        raise InputError(f"max_omega_voxels must be >= 1 or None, got {max_voxels}")
    if max_voxels is None or n_omega <= int(max_voxels):
        return np.arange(n_omega)
    rng = np.random.default_rng([int(seed), 0x0A3E6A])  # its own stream, apart from the noise's
    return np.sort(rng.choice(n_omega, size=int(max_voxels), replace=False))


def smoothgrad(
    model,
    image,
    omega,
    *,
    n_samples: int = 50,
    sigma: float = 0.05,
    sigma_mode: str = "range",
    aggregation: str = "max",
    context: str = "patch",
    seed: int = 0,
    target_class: int | None = None,
    device="auto",
    progress=None,
    chunk_size: int | None = None,
    copies_per_pass: int | None = None,
    precision: str = "fp32",
    roi_size=None,
    max_omega_voxels: int | None = None,
    partial=None,
    partial_every: int = 1,
    partial_interval_s: float | None = None,
) -> np.ndarray:
    """Instance-level SmoothGrad of the lesion Ω: float32 (C, X, Y, Z) on the image's grid.

    aggregation="max": Eq. 3, per noisy copy and input voxel the gradient of largest magnitude over
    the output voxels of Ω, sign kept, averaged over copies. aggregation="mean": Eq. 2, the gradient
    of the mean logit over Ω (one backward pass per copy). n_samples=1 with sigma=0 is the plain
    gradient. Noise ε ~ N(0, σ) is drawn for all channels with one σ (see `noise_sigma`) from a
    generator seeded with `seed`, so equal seeds give equal maps (bit-identical on CPU).
    context="patch" runs the network on the model's roi around Ω, aligned to the network's grid
    (`context_box`; maps are zero outside it); "full" on the whole volume, as the authors' scripts did.
    `progress(done, total)` counts vector-Jacobian products (copies x voxels of Ω); returning False or
    raising `errors.Cancelled` stops the work.
    max_omega_voxels (max aggregation only): when Ω has more voxels, the maximum runs over a seeded
    random subset of that many of them (`omega_sample`), bounding the cost of confluent lesions at
    N x max_omega_voxels VJPs. For lesions much larger than the sample this is a different map, not a
    close approximation (docs/PERFORMANCE.md); off (None) by default.

    Cost: the noisy copies go through the network together, `copies_per_pass` at a time (default: as
    many as memory allows), and one backward pass per voxel of Ω returns the input gradients of all of
    them (the copies are independent in eval mode); on a GPU `chunk_size` voxels of Ω share a batched
    backward pass too (vmap). Neither changes the numbers beyond float32 summation order.

    Partial maps (to show a map early): `partial(copies_done, map_so_far)` is called after the first
    batch of noisy copies, then after a batch when at least `partial_every` more copies are done AND at
    least `partial_interval_s` seconds (default PARTIAL_INTERVAL_S) have passed since the last call,
    whichever is coarser, and last with the final map (the array returned). map_so_far is the mean
    over the copies done so far of the same noise stream: the map `smoothgrad(..., n_samples=copies_done)`
    returns with the same arguments, bit for bit on the CPU when the copies went through the network in
    the same batches (a fixed `copies_per_pass`; the default batches too unless memory differs), else
    to float32 summation order. Partial maps come at batch ends only (8 copies per pass on a CPU). Their
    cost (one division and an uncrop per call) is paid only when `partial` is given; the final map is
    the same either way.
    """
    due = _partial_schedule(partial_every, partial_interval_s) if partial is not None else None
    job = _SmoothGradJob(model, image, omega, n_samples=n_samples, sigma=sigma, sigma_mode=sigma_mode, aggregation=aggregation,
                         context=context, seed=seed, target_class=target_class, device=device, chunk_size=chunk_size,
                         copies_per_pass=copies_per_pass, precision=precision, roi_size=roi_size, max_omega_voxels=max_omega_voxels)
    acc, done = None, 0
    for maps in job.copy_maps(progress):
        for m in maps:  # copy by copy, in order: the same sum as one copy at a time
            acc = m.clone() if acc is None else acc.add_(m)
        done += int(maps.shape[0])
        if due is not None and done < n_samples and due(done):
            partial(done, job.to_image(acc / done))  # the division a run with n_samples=done ends with
    acc /= n_samples
    result = job.to_image(acc)
    if partial is not None:
        partial(n_samples, result)
    return result


PARTIAL_INTERVAL_S = 1.0  # partial maps at most this often by default: each is a volume to show (or write)


def _partial_schedule(every, interval_s):
    """due(copies_done) -> whether a partial map is sent now: the first time, then when both `every`
    copies and `interval_s` seconds have passed since the last one sent."""
    interval_s = PARTIAL_INTERVAL_S if interval_s is None else interval_s
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise InputError(f"partial_every must be an integer >= 1 (noisy copies between partial maps), got {every!r}")
    if isinstance(interval_s, bool) or not isinstance(interval_s, numbers.Real) or not 0 <= interval_s < math.inf:
        raise InputError(f"partial_interval_s must be a number of seconds >= 0, got {interval_s!r}")
    last = {"copies": None, "t": 0.0}

    def due(done):
        now = time.monotonic()
        if last["copies"] is not None and (done - last["copies"] < every or now - last["t"] < interval_s):
            return False
        last.update(copies=done, t=now)
        return True

    return due


@dataclass
class SmoothGradPart:
    """Per-copy signed maxima of Eq. 3 over one part of Ω's voxels (`smoothgrad_part`)."""

    part: int
    n_parts: int
    per_copy: np.ndarray  # (N, C, *box shape) float32
    box: ContextBox
    image_shape: tuple


def omega_work(omega, max_omega_voxels: int | None = None, seed: int = 0) -> int:
    """Voxels of Ω the signed maximum runs over: backward passes per noisy copy (aggregation max)."""
    n = int(np.count_nonzero(omega))
    return int(omega_sample(n, max_omega_voxels, seed).size)


def smoothgrad_part(model, image, omega, *, part: int, n_parts: int, progress=None, **kwargs) -> SmoothGradPart:
    """Eq. 3 over one of `n_parts` contiguous parts of Ω's voxels (in the order `smoothgrad` takes them),
    for splitting a confluent lesion across workers: the signed maximum is associative, so
    `combine_parts` of all the parts equals `smoothgrad(..., aggregation="max")` with the same
    arguments. The result holds one map per noisy copy, (N, C, *patch) float32."""
    if not (isinstance(n_parts, int) and n_parts >= 1 and isinstance(part, int) and 0 <= part < n_parts):
        raise InputError(f"part must be in 0..n_parts-1 with n_parts >= 1; got part {part} of {n_parts}")
    if kwargs.get("aggregation", "max") != "max":
        raise InputError("only the max aggregation (Eq. 3) is split over parts of Ω; the mean is one backward pass per copy")
    job = _SmoothGradJob(model, image, omega, omega_part=(part, n_parts), **kwargs)
    import torch

    per_copy = torch.cat([maps.cpu() for maps in job.copy_maps(progress)]).numpy()
    return SmoothGradPart(part, n_parts, per_copy, job.box, tuple(job.image.shape))


def combine_parts(parts) -> np.ndarray:
    """The SmoothGrad map (C, X, Y, Z) from all the parts of Ω (`smoothgrad_part`), in any order."""
    parts = sorted(parts, key=lambda p: p.part)
    if not parts or [p.part for p in parts] != list(range(parts[0].n_parts)) or any(p.n_parts != parts[0].n_parts for p in parts):
        raise InputError(f"combine_parts needs every part exactly once; got parts {[p.part for p in parts]} "
                         f"of {sorted({p.n_parts for p in parts})}")
    best = parts[0].per_copy.copy()
    for p in parts[1:]:
        if p.per_copy.shape != best.shape or p.box.slices != parts[0].box.slices:
            raise InputError("the parts were computed with different settings (noise copies or context box differ)")
        # strict '>': an earlier part wins ties, as the earlier voxel of Ω does in one pass
        np.copyto(best, p.per_copy, where=np.abs(p.per_copy) > np.abs(best))
    acc = best[0].copy()
    for m in best[1:]:
        acc += m
    acc /= best.shape[0]
    return _uncrop(acc, parts[0].box, parts[0].image_shape)


class _SmoothGradJob:
    """The checked inputs of one SmoothGrad map and the loop over batches of noisy copies."""

    def __init__(self, model, image, omega, *, n_samples=50, sigma=0.05, sigma_mode="range", aggregation="max", context="patch", seed=0,
                 target_class=None, device="auto", chunk_size=None, copies_per_pass=None, precision="fp32", roi_size=None,
                 max_omega_voxels=None, omega_part=(0, 1)):
        import torch

        from ..models.device import resolve_device

        self.image, omega = _check_inputs(image, omega)
        if aggregation not in ("max", "mean"):
            raise InputError(f"aggregation must be 'max' or 'mean', got {aggregation!r}")
        if n_samples < 1:
            raise InputError(f"n_samples must be >= 1, got {n_samples}")
        for name, v in (("chunk_size", chunk_size), ("copies_per_pass", copies_per_pass)):
            if v is not None and int(v) < 1:
                raise InputError(f"{name} must be >= 1 or None, got {v}")
        self.net, spec = _network_and_spec(model)
        self.lesion_logits, _ = _lesion_head(model, target_class)
        self.dev = resolve_device(device)
        self.n_samples, self.aggregation, self.precision = int(n_samples), aggregation, precision
        self.chunk_size, self.copies_per_pass = chunk_size, copies_per_pass
        flair_channel = spec.input_channels.index("flair") if spec is not None and "flair" in spec.input_channels else 0
        self.sd = noise_sigma(self.image, sigma, sigma_mode, flair_channel)
        roi = tuple(roi_size or (spec.roi_size if spec is not None else DEFAULT_ROI))
        self.divisor = _divisor(model, spec)
        self.box = context_box(omega, context, roi, self.divisor)
        self.x0 = _crop_pad(torch.from_numpy(self.image), self.box).to(self.dev)
        om = _crop_pad(torch.from_numpy(omega), self.box).reshape(-1)
        idx = torch.nonzero(om).squeeze(1)
        if aggregation == "max":
            idx = idx[torch.from_numpy(omega_sample(int(idx.numel()), max_omega_voxels, seed))]
            part, n_parts = omega_part
            idx = idx[np.array_split(np.arange(int(idx.numel())), n_parts)[part]]
        self.omega_idx = idx.to(self.dev)
        self.seed = seed

    def to_image(self, acc) -> np.ndarray:
        return _uncrop(acc.cpu().numpy(), self.box, self.image.shape)

    def copy_maps(self, progress):
        """Yields (B, C, *padded box) tensors: each noisy copy's map (signed max over Ω or gradient of the
        mean), batch after batch, copies in the order of the noise stream."""
        import torch

        n_omega = int(self.omega_idx.numel())
        per_copy_vjps = n_omega if self.aggregation == "max" else 1
        total, done = self.n_samples * per_copy_vjps, 0
        noises = noise_stream((self.image.shape[0],) + self.box.shape, self.sd, self.seed)
        inner = (slice(None), slice(None)) + tuple(slice(0, n) for n in self.box.shape)
        with frozen(self.net, self.dev):
            check_backward_fits(self.net, (1, *self.x0.shape), self.dev, self.divisor)
            copies, chunk = self._batch_sizes(n_omega)
            left = self.n_samples
            pending = []  # noise drawn for copies not yet done (kept when a batch has to shrink)
            while left > 0:
                b = min(copies, left)
                while len(pending) < b:
                    pending.append(next(noises))
                x = self.x0.expand(b, *self.x0.shape).clone()
                if self.sd > 0:
                    x[inner] += torch.stack(pending[:b]).to(self.dev)
                x.requires_grad_(True)
                try:
                    with _autocast(self.dev, self.precision):
                        out = self.net(x)
                    selected = self.lesion_logits(out).float().reshape(b, -1)[:, self.omega_idx]
                    del out
                    if self.aggregation == "mean":
                        (maps,) = torch.autograd.grad(selected.mean(dim=1).sum(), x)
                    else:  # reports its own progress, chunk by chunk
                        maps, chunk = _signed_max_over_omega(selected, x, chunk, progress, done, total)
                except RuntimeError as exc:
                    copies = _halved_after_oom(exc, copies, self.dev)  # fewer copies per pass, same noise
                    continue
                del selected, x
                pending = pending[b:]
                left -= b
                done += b * per_copy_vjps
                if self.aggregation == "mean":
                    report(progress, done, total)
                yield maps

    def _batch_sizes(self, n_omega: int) -> tuple[int, int]:
        """(noisy copies per forward pass, Ω voxels per batched backward pass) fitting free memory."""
        gpu_chunk = self.chunk_size is None and self.aggregation == "max" and self.dev.type == "cuda"
        # the memory estimate costs a forward pass: not made when there is nothing to fit (one noisy copy on a CPU)
        if (self.copies_per_pass is None and self.n_samples > 1) or gpu_chunk:
            per_copy = max(_activation_bytes(self.net, self.x0[None]), 1)
            avail = _available_bytes(self.dev)
        if self.copies_per_pass is not None:
            copies = int(self.copies_per_pass)
        elif self.n_samples == 1:
            copies = 1
        else:
            # a forward pass keeps its activations (x1) and a backward pass needs about as much again
            cap = MAX_COPIES_PER_PASS[self.dev.type == "cuda"]
            copies = int(max(1, min(self.n_samples, cap, 0.4 * avail // (2 * per_copy))))
            if self.dev.type == "cpu":  # larger batches were slower once their activations outgrew the cache
                copies = max(1, min(copies, CPU_PASS_ACTIVATION_BYTES // per_copy))
        if self.chunk_size is not None:
            chunk = int(self.chunk_size)
        else:
            chunk = _chunk_fitting(per_copy, avail, n_omega, copies) if gpu_chunk else 1
        return copies, chunk


def _signed_max_over_omega(selected, x, chunk, progress, done, total):
    """For a batch of noisy copies: per copy and input voxel, the VJP of largest |value| over Ω's logits,
    with its sign. `selected` is (B, |Ω|) logits of the copies in `x` (B, C, ...)."""
    import torch

    b, n = selected.shape
    best = torch.zeros_like(x)
    best_abs = torch.zeros_like(x)
    start = 0
    while start < n:
        k = min(chunk, n - start)
        try:
            cot = torch.zeros((k, b, n), device=selected.device, dtype=selected.dtype)
            cot[torch.arange(k), :, torch.arange(start, start + k)] = 1.0
            last = start + k >= n
            grads = _batched_vjp(selected, x, cot, retain=not last)
        except RuntimeError as exc:
            chunk = _halved_after_oom(exc, chunk, selected.device)  # shrink and retry the same voxels
            continue
        if k == 1:
            cand = grads[0]
        else:
            cand = torch.gather(grads, 0, grads.abs().argmax(dim=0, keepdim=True))[0]
        cand_abs = cand.abs()
        # strict '>' keeps the first voxel of Ω on ties, like a loop over Ω in order
        update = cand_abs > best_abs
        best = torch.where(update, cand, best)
        best_abs = torch.where(update, cand_abs, best_abs)
        del grads, cand, cand_abs, update
        start += k
        done += k * b
        report(progress, done, total)
    return best, chunk


_VMAP_OK = {"ok": True}


def _batched_vjp(selected, x, cotangents, retain: bool):
    """VJPs of `selected` for each row of `cotangents`: (K, *x.shape). Falls back to a loop without vmap support."""
    import torch

    if _VMAP_OK["ok"] and cotangents.shape[0] > 1:
        try:
            (g,) = torch.autograd.grad(selected, x, cotangents, retain_graph=retain, is_grads_batched=True)
            return g
        except RuntimeError as exc:
            if _is_oom(exc) or "vmap" not in str(exc).lower() and "batch" not in str(exc).lower():
                raise
            _VMAP_OK["ok"] = False
            warnings.warn(f"batched backward unsupported by this network ({str(exc)[:120]}); using one VJP at a time")
    out = []
    for i in range(cotangents.shape[0]):
        keep = retain or i < cotangents.shape[0] - 1
        (g,) = torch.autograd.grad(selected, x, cotangents[i], retain_graph=keep)
        out.append(g)
    return torch.stack(out)
