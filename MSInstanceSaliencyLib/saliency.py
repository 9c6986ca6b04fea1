"""Instance-level saliency: SmoothGrad (mean and max-with-sign, Eqs. 2-3) and Grad-CAM++ (Eqs. 4-10).

METHOD.md is the specification. The costly part is Eq. 3: for every noisy copy, the gradient of
each lesion voxel's logit with respect to the input, reduced voxel-wise by the signed maximum of
absolute values. Instead of one `torch.autograd.grad` per voxel (the authors' scripts), each noisy
copy gets one forward pass, and the |Ω| vector-Jacobian products go through the backward graph in
chunks (`is_grads_batched=True`, i.e. vmap), reduced chunk by chunk so the Jacobian is never held.

Arrays: `image` is (C, X, Y, Z) float32 prepared for the network; `omega` is a boolean (X, Y, Z).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .progress import report

DEFAULT_ROI = (96, 96, 96)


# ----------------------------------------------------------------------------- model helpers

def _network_and_spec(model):
    """(torch module, spec or None) from a LoadedModel or a plain torch.nn.Module."""
    spec = getattr(model, "spec", None)
    net = getattr(model, "network", model)
    return net, spec


def _lesion_head(model, target_class):
    """(logit, probability) functions of the network's output (B, K, ...) -> (B, ...): the model's own
    (its lesion class and output activation), or channel `target_class` under softmax for a plain module."""
    import torch

    if target_class is None and hasattr(model, "lesion_logits"):
        return model.lesion_logits, model.probability
    k = 1 if target_class is None else int(target_class)
    return (lambda out: out[:, k]), (lambda out: torch.softmax(out, dim=1)[:, k])


@contextlib.contextmanager
def frozen(net, device=None):
    """Eval mode, no parameter gradients and (given a device) the network on it for the duration;
    the caller's mode, flags and device are restored (a no-op move for a LoadedModel, already there)."""
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()]
    home = flags[0][0].device if flags else None
    net.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        if device is not None:
            net.to(device)
        yield net
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)
        if device is not None and home is not None:
            net.to(home)


def size_divisor(spec) -> int:
    """Input sizes the network accepts are multiples of this (product of the down-sampling strides)."""
    if spec is None:
        return 16
    strides = spec.network_args.get("strides")
    if not strides:
        return 32 if "swin" in spec.network_class.lower() else 16
    d = 1
    for s in strides:
        d *= int(max(s) if isinstance(s, (list, tuple)) else s)
    return d


def _divisor(model, spec) -> int:
    d = getattr(model, "size_divisor", None)
    return int(d) if isinstance(d, int) else size_divisor(spec)


def list_layers(model) -> list[tuple[str, str]]:
    """(name, type) of the convolution-like layers a Grad-CAM++ map can be computed from, input to output."""
    net, _ = _network_and_spec(model)
    out = []
    for name, mod in net.named_modules():
        kind = type(mod).__name__
        if name and ("Conv" in kind or kind in ("Convolution", "ResidualUnit", "UnetResBlock", "UnetBasicBlock", "UnetUpBlock")):
            out.append((name, kind))
    return out


# ----------------------------------------------------------------------------- context boxes

@dataclass
class ContextBox:
    """Where the network looks: a box of the volume (slices) and zero padding at its far ends."""

    slices: tuple
    pad: tuple  # per axis, voxels of padding after the box

    @property
    def shape(self):
        return tuple(s.stop - s.start for s in self.slices)

    @property
    def padded_shape(self):
        return tuple(n + p for n, p in zip(self.shape, self.pad))


def context_box(omega: np.ndarray, context: str, roi=DEFAULT_ROI, divisor: int = 16) -> ContextBox:
    """The network's input box for `omega`.

    patch: about the roi centred on Ω's bounding box, grown when Ω is larger, on the network's grid:
    its origin and size are multiples of `divisor` (the network's total down-sampling), so the
    network computes on the patch what it computes there on the whole volume, up to what lies beyond
    the patch (strided convolutions are not shift-equivariant; an off-grid patch measured map
    correlations of 0.52-0.82 with the whole-volume map, on-grid 0.99: docs/PERFORMANCE.md).
    full: the whole volume. Both are zero-padded at the far ends to multiples of `divisor`, as the
    whole volume is, so a patch reaching the volume's end sees the same padding.
    """
    shape = omega.shape
    if context == "full":
        slices = tuple(slice(0, n) for n in shape)
    elif context == "patch":
        idx = np.argwhere(omega)
        lo, hi = idx.min(0), idx.max(0)
        slices = tuple(_grid_slice(int(lo[a]), int(hi[a]), int(n), int(roi[a]), divisor) for a, n in enumerate(shape))
    else:
        raise InputError(f"context must be 'patch' or 'full', got {context!r}")
    pad = tuple(int(math.ceil((s.stop - s.start) / divisor) * divisor) - (s.stop - s.start) for s in slices)
    return ContextBox(slices, pad)


def _grid_slice(lo: int, hi: int, n: int, roi: int, d: int) -> slice:
    """Along one axis: a window with origin and size multiples of d, about `roi` long (at least
    covering lo..hi), centred on lo..hi as nearly as the grid allows, inside the padded axis."""
    padded = int(math.ceil(n / d) * d)
    size = int(math.ceil(max(roi, hi - lo + 1) / d) * d)
    while True:
        if size >= padded:
            return slice(0, n)
        start = int(round(((lo + hi + 1) / 2 - size / 2) / d)) * d
        start = min(max(start, 0), padded - size)
        start = min(start, lo // d * d)  # Ω's first voxel inside
        if hi < start + size:
            return slice(start, min(start + size, n))
        size += d  # Ω straddles a grid line the window cannot cover: one more cell


def _crop_pad(t, box: ContextBox):
    """Crop a (..., X, Y, Z) tensor to the box and zero-pad it at the far ends."""
    import torch.nn.functional as F

    x = t[(Ellipsis,) + box.slices]
    if any(box.pad):
        x = F.pad(x, (0, box.pad[2], 0, box.pad[1], 0, box.pad[0]))
    return x


def _check_inputs(image, omega, allow_none=False):
    image = np.asarray(image)
    if image.ndim != 4:
        raise InputError(f"image must be (C, X, Y, Z); got shape {image.shape}")
    if not np.isfinite(image).all():
        raise InputError("image contains NaN or Inf values")
    if omega is None:
        if allow_none:
            return image.astype(np.float32, copy=False), None
        raise InputError("omega (the lesion's voxels) is required")
    omega = np.asarray(omega).astype(bool)
    if omega.shape != image.shape[1:]:
        raise InputError(f"omega has shape {omega.shape} but the image grid is {image.shape[1:]}")
    if not omega.any():
        raise InputError("omega is empty: give at least one voxel (a lesion id that exists, or a non-empty mask)")
    return image.astype(np.float32, copy=False), omega


def _autocast(device, precision):
    import torch

    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise InputError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- chunk sizing

def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _activation_bytes(net, x) -> int:
    """Bytes of all module outputs in one forward pass: what one backward pass roughly needs again."""
    import torch

    total = [0]
    kept = {}  # outputs held until the end, as a pass with gradients holds them, so no storage is reused

    def hook(_m, _i, out):
        # an in-place layer (LeakyReLU(inplace=True)) returns its input's storage: count it once
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in kept:
            kept[out.untyped_storage().data_ptr()] = out
            total[0] += out.numel() * out.element_size()

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


GIB = 1 << 30
PROBE_SIDE = 64  # estimate backward memory from a forward pass on a crop this large


def backward_bytes(net, shape, divisor: int = 16) -> int:
    """Memory one backward pass needs for an input of `shape` (1, C, X, Y, Z): about the activations of
    the forward pass, which autograd keeps for it (peak resident memory of a forward + backward pass of
    LST-AI's mdlA at 96^3 measured 0.83x of them on the CPU). Measured on a PROBE_SIDE^3 crop and scaled
    with the voxel count (activations grow linearly with it: benchmarks/model_memory.py)."""
    import torch

    probe = [max(divisor, min(int(n), PROBE_SIDE) // divisor * divisor) for n in shape[2:]]
    dev = next(net.parameters()).device
    per_probe = _activation_bytes(net, torch.zeros((1, shape[1], *probe), device=dev))
    return int(per_probe * math.prod(shape[2:]) / math.prod(probe))


def check_backward_fits(net, shape, device, divisor: int = 16, what: str = "") -> None:
    """InputError, before any work, when one backward pass over an input of `shape` cannot fit the free
    memory of `device` (whole-volume context of large networks: LST-AI at 192^3)."""
    if math.prod(shape[2:]) <= 128 ** 3:
        return
    need = backward_bytes(net, shape, divisor)
    avail = _available_bytes(device)
    if need > 0.9 * avail:
        members = getattr(net, "members", None)
        per = f", {need / len(members) / GIB:.1f} GiB per ensemble member" if members is not None and len(members) > 1 else ""
        raise InputError(f"one backward pass of the network over its {'x'.join(map(str, shape[2:]))} input{what} needs about "
                         f"{need / GIB:.1f} GiB in fp32{per}, but {device} has {avail / GIB:.1f} GiB free: use a GPU with more memory, "
                         "or a single ensemble member as --model")


def _halved_after_oom(exc, size: int, device) -> int:
    """Half of a batch size after an out-of-memory error (the cache emptied); any other error, or one
    at size 1, is raised again."""
    import torch

    if not _is_oom(exc) or size == 1:
        raise exc
    exc.__traceback__ = None  # its frames hold the failed pass's tensors: free them before emptying the cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return max(1, size // 2)


def _is_oom(exc) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


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
    """
    job = _SmoothGradJob(model, image, omega, n_samples=n_samples, sigma=sigma, sigma_mode=sigma_mode, aggregation=aggregation,
                         context=context, seed=seed, target_class=target_class, device=device, chunk_size=chunk_size,
                         copies_per_pass=copies_per_pass, precision=precision, roi_size=roi_size, max_omega_voxels=max_omega_voxels)
    acc = None
    for maps in job.copy_maps(progress):
        for m in maps:  # copy by copy, in order: the same sum as one copy at a time
            acc = m.clone() if acc is None else acc.add_(m)
    acc /= n_samples
    return job.to_image(acc)


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


def _uncrop(acc: np.ndarray, box: ContextBox, image_shape) -> np.ndarray:
    """A (C, *padded box) map back on the image's grid (C, X, Y, Z), zero outside the box."""
    result = np.zeros(image_shape, np.float32)
    result[(slice(None),) + box.slices] = acc[(slice(None),) + tuple(slice(0, n) for n in box.shape)]
    return result


class _SmoothGradJob:
    """The checked inputs of one SmoothGrad map and the loop over batches of noisy copies."""

    def __init__(self, model, image, omega, *, n_samples=50, sigma=0.05, sigma_mode="range", aggregation="max", context="patch", seed=0,
                 target_class=None, device="auto", chunk_size=None, copies_per_pass=None, precision="fp32", roi_size=None,
                 max_omega_voxels=None, omega_part=(0, 1)):
        import torch

        from .model import resolve_device

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
        if self.copies_per_pass is None or gpu_chunk:
            per_copy = max(_activation_bytes(self.net, self.x0[None]), 1)
            avail = _available_bytes(self.dev)
        if self.copies_per_pass is not None:
            copies = int(self.copies_per_pass)
        else:
            # a forward pass keeps its activations (x1) and a backward pass needs about as much again
            cap = MAX_COPIES_PER_PASS[self.dev.type == "cuda"]
            copies = int(max(1, min(self.n_samples, cap, 0.4 * avail // (2 * per_copy))))
        if self.chunk_size is not None:
            chunk = int(self.chunk_size)
        else:
            chunk = _chunk_fitting(per_copy, avail, n_omega, copies) if gpu_chunk else 1
        return copies, chunk


# Noisy copies per forward pass at most (CPU, GPU). On the 2-core CPU, s per lesion with 1 / 4 / 8 / 16
# copies per pass: 68.3 / 37.4 / 36.5 / 57.2 (benchmarks/saliency_speed.py --copies-sweep 1,4,8,16,
# docs/PERFORMANCE.md); a GPU is bounded by its memory.
MAX_COPIES_PER_PASS = (8, 64)


def auto_chunk_size(net, x, device, n_omega: int, copies: int = 1) -> int:
    """Ω voxels per batched backward pass over `copies` noisy copies. GPU: as many as 60% of free memory
    holds (at most 256). CPU: 1, since batching through vmap measured slower there than one VJP after
    another on a retained graph (docs/PERFORMANCE.md, chunk sweep)."""
    if device.type != "cuda":
        return 1
    return _chunk_fitting(max(_activation_bytes(net, x), 1), _available_bytes(device), n_omega, copies)


def _chunk_fitting(per_copy_bytes: int, avail: int, n_omega: int, copies: int) -> int:
    """Ω voxels per batched backward pass: 60 % of free memory over about twice the activations of the
    copies, at most 256 and |Ω|."""
    return int(max(1, min(n_omega, 256, 0.6 * avail // (2 * copies * per_copy_bytes))))


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


# ----------------------------------------------------------------------------- Grad-CAM++

def gradcampp(
    model,
    image,
    omega=None,
    *,
    layer: str | None = None,
    threshold: float = 0.3,
    alpha: str = "paper",
    device="auto",
    context: str | None = None,
    target_class: int | None = None,
    roi_size=None,
    upsample: bool = True,
) -> np.ndarray:
    """Grad-CAM++ map (X, Y, Z) float32 on the image's grid.

    omega=None: class-level map (Eqs. 4-7), y' = sum of the lesion logits where the lesion
    probability exceeds `threshold`, channel weights summed over space. A mask: instance-level map
    (Eqs. 8-10), y' = sum of the logits over Ω, per-voxel weights. alpha="paper" is Eq. 7,
    g² / (2g² + (Σ_v A)·g³) with α = 0 where g = 0; alpha="monai" reproduces MONAI's GradCAMpp
    (Σ_v A·g³ in the denominator, gradient scaled by exp(y'), whose exponent is capped at 80 so
    float32 cannot overflow); alpha="layercam" sets α ≡ 1 (LayerCAM, a cross-check). The map is
    upsampled trilinearly to the input grid (upsample=False returns it at the layer's resolution,
    context "full" only).
    context: "full" (default for class-level) or "patch" (default for instance-level).
    """
    import torch
    import torch.nn.functional as F

    from .model import resolve_device

    image, omega = _check_inputs(image, omega, allow_none=True)
    if alpha not in ("paper", "monai", "layercam"):
        raise InputError(f"alpha must be 'paper', 'monai' or 'layercam', got {alpha!r}")
    net, spec = _network_and_spec(model)
    lesion_logits, lesion_probability = _lesion_head(model, target_class)
    layer = layer or (spec.gradcam_layer if spec is not None else None)
    modules = dict(net.named_modules())
    if layer not in modules:
        names = ", ".join(n for n, _ in list_layers(net)[:40])
        raise InputError(f"layer {layer!r} is not in the network; choose one of: {names}")
    dev = resolve_device(device)
    context = context or ("full" if omega is None else "patch")
    if omega is None and context != "full":
        raise InputError("a class-level Grad-CAM++ map (no omega) needs context='full'")
    roi = tuple(roi_size or (spec.roi_size if spec is not None else DEFAULT_ROI))
    box = context_box(omega if omega is not None else np.ones(image.shape[1:], bool), context, roi, _divisor(model, spec))
    x = _crop_pad(torch.from_numpy(image), box).to(dev)[None]

    store = {}
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: store.__setitem__("A", out))
    try:
        with frozen(net, dev):
            check_backward_fits(net, tuple(x.shape), dev, _divisor(model, spec))
            x.requires_grad_(True)  # so that the layer's activations are part of the graph
            out = net(x)
            logits = lesion_logits(out)
            if omega is None:
                prob = lesion_probability(out)
                valid = torch.zeros_like(prob, dtype=torch.bool)
                valid[(slice(None),) + tuple(slice(0, n) for n in box.shape)] = True
                score = logits[(prob > threshold) & valid].sum()
            else:
                om = _crop_pad(torch.from_numpy(omega), box).to(dev)[None]
                score = logits[om].sum()
            acts = store["A"]
            (grad,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    cam = _gradcampp_map(acts.detach().float(), grad.float(), score.detach().float(), instance=omega is not None, alpha=alpha)
    if not upsample:
        if context != "full" or any(box.pad):
            raise InputError("upsample=False needs context='full' on a volume the network takes without padding")
        return cam[0, 0].cpu().numpy().astype(np.float32)
    cam = F.interpolate(cam, size=box.padded_shape, mode="trilinear", align_corners=False)
    result = np.zeros(image.shape[1:], np.float32)
    result[box.slices] = cam[0, 0][tuple(slice(0, n) for n in box.shape)].cpu().numpy()
    return result


def _gradcampp_map(acts, grad, score, *, instance: bool, alpha: str):
    """(1, 1, ...) map at the layer's resolution from activations A and gradients g = ∂y'/∂A."""
    import torch
    import torch.nn.functional as F

    b, c, *spatial = grad.shape
    flat = lambda t: t.reshape(b, c, -1)  # noqa: E731
    per_channel = lambda t: t.reshape(b, c, *[1] * len(spatial))  # noqa: E731
    g2 = grad.pow(2)
    if alpha == "paper":
        denom = 2 * g2 + per_channel(flat(acts).sum(-1)) * grad.pow(3)
        a = torch.where((grad != 0) & (denom != 0), g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
        relu_grad = F.relu(grad)
    elif alpha == "layercam":
        a = torch.ones_like(g2)
        relu_grad = F.relu(grad)
    else:
        denom = 2 * g2 + per_channel(flat(acts * grad.pow(3)).sum(-1))
        denom = torch.where(denom != 0.0, denom, torch.ones_like(denom))
        a = g2 / (denom + 1e-7)
        relu_grad = F.relu(torch.exp(torch.clamp(score, max=80.0)) * grad)
    weights = a * relu_grad
    if not instance:
        weights = per_channel(flat(weights).sum(-1))
    return F.relu((weights * acts).sum(1, keepdim=True))
