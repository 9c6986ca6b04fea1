"""LST-AI 2.x checkpoints (the pip package lst-ai, MIT): its three-member U-Net ensemble, or one member.

What LST-AI's `unet_segmentation` does, without lst_ai: its inputs are its registered, skull-stripped
MNI-space FLAIR and T1 (the --temp outputs mni_flair.nii.gz and mni_t1.nii.gz), centre-cropped to
192^3; each image is clipped to its 0.5 and 99.5 percentiles over the brain (non-zero voxels) and
scaled to [0, 1] there, 0 outside; every member sees the whole crop (instance norm over the volume,
so the context is always the whole crop) and gives a sigmoid probability; the ensemble is their mean,
thresholded at 0.5; the crop is padded back with zeros. Testing/Python/test_lstai_model.py compares it
with lst_ai's own inference on a checkpoint written in its format.

A checkpoint is {"config": the network's arguments, "state_dict": tensors}, read with weights_only.
The network here is this package's own module with LST-AI's layer names (so its state_dicts load) and
its numerics (leaky ReLU 0.3, instance norm eps 1e-3 with affine parameters, no conv biases); it
returns the lesion logit, which saliency explains (for the ensemble, the mean of the members' logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import LoadedModel, ModelSpec, _is_int, check_state_dict, checked_channels, freeze, load_weights, mean_of_members, probe_network
from .formats import lstai_checkpoints

INPUT_SHAPE = (192, 192, 192)  # LST-AI's crop of the 193 x 229 x 193 MNI grid
CLIPPING = (0.5, 99.5)  # percentiles over the brain
LEAKY_SLOPE = 0.3  # TensorFlow-trained numerics the released weights expect
NORM_EPS = 1e-3
CONFIG_KEYS = ("in_channels", "n_conv_blocks", "n_filters", "n_classes", "ds_layers", "bottleneck_filters")
# Ranges of a checkpoint's config, checked before anything is built. The released members have 24-32
# filters and 5 blocks; the 192^3 crop halves at most 6 times (192 = 3 * 2^6).
CONFIG_RANGES = {"in_channels": (1, 2), "n_conv_blocks": (1, 6), "n_filters": (1, 256), "n_classes": (1, 8),
                 "bottleneck_filters": (1, 4096)}
# Memory of a whole-crop backward pass: benchmarks/model_memory.py (saliency.common.check_backward_fits refuses what does not fit).


def build_lstai_network(config: dict):
    """LST-AI's nnU-Net-style 3D U-Net (lst_ai/model.py's layer names), returning the logits of out_seg."""
    import torch
    from torch import nn

    def unit(conv):
        # conv -> instance norm with affine parameters (GroupNorm with one channel per group) -> leaky ReLU
        return [conv, nn.GroupNorm(conv.out_channels, conv.out_channels, eps=NORM_EPS, affine=True), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]

    class Block(nn.Module):
        """lst_ai's ConvBlock (two 3x3x3 units), DownConv and UpConv (one strided 4x4x4 unit): the layers in `block`."""

        def __init__(self, *convs):
            super().__init__()
            self.block = nn.Sequential(*[layer for conv in convs for layer in unit(conv)])

        def forward(self, x):
            return self.block(x)

    def double(cin, cout):
        return Block(nn.Conv3d(cin, cout, 3, 1, 1, bias=False), nn.Conv3d(cout, cout, 3, 1, 1, bias=False))

    def single(conv):
        return Block(conv)

    class LSTAIUNet(nn.Module):
        def __init__(self, in_channels=2, n_conv_blocks=5, n_filters=32, n_classes=1, ds_layers=(), bottleneck_filters=None):
            super().__init__()
            widths = [n_filters * i for i in range(1, n_conv_blocks + 1)]
            bottleneck = bottleneck_filters or n_filters * n_conv_blocks
            self.n_conv_blocks, self.n_classes = n_conv_blocks, n_classes
            self.stem = double(in_channels, widths[0])
            self.enc_down = nn.ModuleList(single(nn.Conv3d(widths[i - 1], widths[i], 4, 2, 1, bias=False)) for i in range(1, n_conv_blocks))
            self.enc_conv = nn.ModuleList(double(widths[i], widths[i]) for i in range(1, n_conv_blocks))
            self.bottleneck_down = single(nn.Conv3d(widths[-1], bottleneck, 4, 2, 1, bias=False))
            self.bottleneck_conv = double(bottleneck, bottleneck)
            ups, convs, prev = [], [], bottleneck
            for level in range(n_conv_blocks - 1, -1, -1):
                ups.append(single(nn.ConvTranspose3d(prev, widths[level], 4, 2, 1, bias=False)))
                convs.append(double(2 * widths[level], widths[level]))
                prev = widths[level]
            self.dec_up, self.dec_conv = nn.ModuleList(ups), nn.ModuleList(convs)
            self.out_seg = nn.Conv3d(widths[0], n_classes, 1)
            # deep-supervision heads: in the checkpoints, unused at inference
            self.ds_heads = nn.ModuleList(nn.Conv3d(widths[::-1][d], n_classes, 1) for d in ds_layers)

        def forward(self, x):
            skips, h = [], self.stem(x)
            skips.append(h)
            for down, conv in zip(self.enc_down, self.enc_conv):
                h = conv(down(h))
                skips.append(h)
            h = self.bottleneck_conv(self.bottleneck_down(h))
            for i, (up, conv) in enumerate(zip(self.dec_up, self.dec_conv)):
                h = conv(torch.cat([skips[self.n_conv_blocks - 1 - i], up(h)], dim=1))
            return self.out_seg(h)

    return LSTAIUNet(**config)


def checked_config(config: dict, source) -> dict:
    """The network arguments of a checkpoint's config, each of the right type and in range (else one line naming it)."""
    cfg = {k: config[k] for k in CONFIG_KEYS if k in config}
    for key, (lo, hi) in CONFIG_RANGES.items():
        value = cfg.get(key)
        if key in cfg and not (key == "bottleneck_filters" and value is None) and not (_is_int(value) and lo <= value <= hi):
            raise InputError(f"{source}: config {key} is {value!r}; it must be an integer from {lo} to {hi}")
    n = cfg.get("n_conv_blocks", 5)
    ds = cfg.get("ds_layers", ())
    if not (isinstance(ds, (list, tuple)) and all(_is_int(d) and -n <= d < n for d in ds)):
        raise InputError(f"{source}: config ds_layers is {ds!r}; it must list decoder levels from {-n} to {n - 1} "
                         f"(n_conv_blocks {n})")
    cfg["ds_layers"] = tuple(ds)
    return cfg


def check_fits(cfg: dict, state: dict, source) -> None:
    """The checkpoint's tensors have the shapes of the network its config describes, compared on torch's
    meta device (no memory) before the network is built: a config may describe a network of any size."""
    import torch

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_lstai_network(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = [k for k in expected if k in got and expected[k] != got[k]]
    if wrong:
        detail = f"{wrong[0]} is {got[wrong[0]]} in the checkpoint, {expected[wrong[0]]} in the network"
    elif missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
    else:
        return
    raise InputError(f"{source}: the weights do not fit the network its config describes ({cfg}): {detail}")


@dataclass
class CropGrid:
    """The network's grid is a centred crop (or zero padding) of the reference grid, as LST-AI's adapt_shape."""

    shape: tuple  # the reference's
    lo: tuple  # voxels removed before, per axis
    hi: tuple  # after
    same: bool = field(default=False)

    @classmethod
    def centred(cls, shape, target):
        diff = [s - t for s, t in zip(shape, target)]
        return cls(tuple(shape), tuple(d // 2 + d % 2 for d in diff), tuple(d // 2 for d in diff))

    def crop(self, a: np.ndarray) -> np.ndarray:
        return a[tuple(slice(lo, n - hi) for lo, hi, n in zip(self.lo, self.hi, self.shape))]

    def to_network(self, mask):
        return self.crop(np.asarray(mask))

    def to_reference(self, array, kind: str = "linear"):
        return np.pad(np.asarray(array, np.float32), list(zip(self.lo, self.hi)), "constant", constant_values=0.0)

    def describe(self) -> str:
        return f"LST-AI's centred {'x'.join(str(n - lo - hi) for n, lo, hi in zip(self.shape, self.lo, self.hi))} crop"


def scale_intensities(a: np.ndarray, clipping=CLIPPING) -> np.ndarray:
    """LST-AI's intensity standardisation of one float32 image: clip to the brain's percentiles, [0, 1] over the brain, 0 outside."""
    brain = (a != 0).astype(np.float64)
    inside = brain != 0
    if not inside.any():
        raise InputError("an LST-AI input image is all zeros inside its 192^3 crop; give its skull-stripped MNI-space images")
    a = np.clip(a, a_min=np.percentile(a[inside], clipping[0]), a_max=np.percentile(a[inside], clipping[1]))
    a -= a[inside].min()
    a = a / a[inside].max()
    a *= brain
    return a.astype(np.float32)


@dataclass
class LSTAIModel(LoadedModel):
    members: list = field(default_factory=list)  # checkpoint files
    input_shape: tuple = INPUT_SHAPE
    configs: list = field(default_factory=list)  # each member's network arguments, from its checkpoint

    format = "lst-ai"

    @property
    def size_divisor(self) -> int:
        return 2 ** self.spec.network_args.get("n_conv_blocks", 5)

    def prepare(self, flair, mprage=None, *, register: bool = False, n4: bool = False):
        from .preprocessing import PreparedCase, align_inputs
        from ..io.volumes import array_from_image

        if register or n4:
            raise InputError("LST-AI models take LST-AI's own registered, skull-stripped MNI-space images (its --temp outputs "
                             "mni_flair.nii.gz and mni_t1.nii.gz); --register and --n4 do not apply")
        images, reference, steps, covered, valid, warnings = align_inputs(flair, mprage, self.spec.input_channels)
        if any(n < t for n, t in zip(reference.GetSize(), self.input_shape)) and reference.GetSize() != self.input_shape:
            raise InputError(f"LST-AI's inputs are its MNI-space images (193 x 229 x 193 at 1 mm), at least {self.input_shape}; got "
                             f"{reference.GetSize()}. Run LST-AI with --temp and give its mni_flair.nii.gz and mni_t1.nii.gz")
        grid = CropGrid.centred(tuple(reference.GetSize()), self.input_shape)
        arrays = [scale_intensities(grid.crop(array_from_image(images[c], np.float64)).astype(np.float32)) for c in self.spec.input_channels]
        steps += [f"{grid.describe()}; clipped to the {CLIPPING[0]}-{CLIPPING[1]} percentiles of the brain and scaled to [0, 1]"]
        return PreparedCase(np.stack(arrays), reference, list(self.spec.input_channels), images["flair"], steps, valid, warnings, grid)

    def predict_probability(self, image, *, device="auto", progress=None, sw_batch_size: int = 1):
        """The mean of the members' sigmoid probabilities on the whole crop, as LST-AI averages them."""
        import torch

        from .device import resolve_device
        from ..progress import report

        dev = resolve_device(device)
        self.network.to(dev)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(dev)
        joint = np.zeros(image.shape[1:])
        members = self.network.members
        with torch.no_grad():
            for i, net in enumerate(members):
                report(progress, i, len(members))
                joint += self.probability(net(x))[0].cpu().numpy()
        report(progress, len(members), len(members))
        return (joint / len(members)).astype(np.float32)

    def identity_extras(self) -> dict:
        # the members' weights are hashed as the ensemble's; these decide how they are built and what they see
        return {"configs": self.configs, "input_shape": list(self.input_shape)}

    def describe(self) -> dict:
        return {**super().describe(), "members": [Path(m).name for m in self.members], "input_shape": list(self.input_shape)}

    def expects(self) -> str:
        return (f"LST-AI's MNI-space, skull-stripped FLAIR + T1 (its --temp mni_flair/mni_t1); centre crop "
                f"{'x'.join(map(str, self.input_shape))}, percentile clip and [0, 1] scaling; {len(self.members)}-member ensemble, "
                "sigmoid, threshold 0.5")


def load_lstai_model(path, *, device="cpu", channels=None) -> LSTAIModel:
    path = Path(path)
    files = [path] if path.is_file() else lstai_checkpoints(path)
    if not files:
        raise InputError(f"{path} holds no LST-AI 2.x checkpoint")
    nets, config, configs = [], None, []
    for f in files:
        ckpt = load_weights(f)  # read once; the format is checked on what was read
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("state_dict"), dict)):
            raise InputError(f"{f} is not an LST-AI 2.x checkpoint ({{'config': ..., 'state_dict': ...}})")
        cfg = checked_config(ckpt["config"], f)
        check_state_dict(ckpt["state_dict"], f)  # tensors only, all finite: a NaN bias gives "0 lesions" silently
        check_fits(cfg, ckpt["state_dict"], f)
        net = build_lstai_network(cfg)
        try:
            net.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            raise InputError(f"{f}: the weights do not fit the network its config describes: {str(exc).splitlines()[0][:200]}") from None
        if config is not None and (cfg.get("in_channels", 2), cfg.get("n_classes", 1)) != (config.get("in_channels", 2), config.get("n_classes", 1)):
            raise InputError(f"{f}: the ensemble's members take different inputs or give different outputs")
        config = config or cfg
        nets.append(net)
        configs.append(cfg)
    n_in, n_classes = int(config.get("in_channels", 2)), int(config.get("n_classes", 1))
    order = ["flair", "mprage"][:n_in] if channels is None else checked_channels(channels, n_in, str(path))
    network = mean_of_members(nets)
    freeze(network)
    network.to(device)
    stages = int(config.get("n_conv_blocks", 5))
    spec = ModelSpec(network_class="LSTAIUNet", network_args={"in_channels": n_in, "out_channels": n_classes, "n_conv_blocks": stages},
                     input_channels=order, normalization="lst-ai", roi_size=list(INPUT_SHAPE), overlap=0.0, threshold=0.5,
                     min_lesion_mm3=0.0, lesion_class=0 if n_classes == 1 else 1,
                     output_activation="sigmoid" if n_classes == 1 else "softmax",
                     gradcam_layer=f"members.0.dec_conv.{max(stages - 3, 0)}", weights=",".join(f.name for f in files),
                     name="lst-ai", version="2.x", description=f"LST-AI 2.x U-Net ensemble of {len(files)} member(s)")
    # one small forward pass, as model.json networks are probed: the smallest input its down-sampling takes
    # with 2 voxels per axis left at the bottleneck (instance norm needs more than one value)
    probe_network(network, spec, device, source=str(path), window=[2 ** (stages + 1)] * 3)
    return LSTAIModel(network, spec, path, members=[str(f) for f in files], configs=configs)
