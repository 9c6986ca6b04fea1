"""Draw the module icon (128x128) and the extension icon from a phantom FLAIR slice and a saliency map.

    .venv/bin/python scripts/make_icons.py DEMO_OUT_DIR
where DEMO_OUT_DIR holds the outputs of `msis demo` (phantom_flair.nii.gz and a saliency_lesion*_smoothgrad_flair.nii.gz).
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(demo_dir):
    d = Path(demo_dir)
    flair = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(d / "phantom_flair.nii.gz")), "LPS"))
    sal_path = sorted(d.glob("saliency_lesion*_smoothgrad_flair.nii.gz"))[0]
    sal = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(sal_path)), "LPS"))
    k = int(np.argmax(np.abs(sal).sum((1, 2))))  # axial slice with the most saliency
    f, s = flair[k], sal[k]
    cy, cx = np.unravel_index(np.argmax(np.abs(s)), s.shape)  # zoom on the lesion: 80 voxels across
    ys, xs = slice(max(cy - 40, 0), cy + 40), slice(max(cx - 40, 0), cx + 40)
    f, s = f[ys, xs], s[ys, xs]
    vmax = np.abs(s).max() or 1.0
    for out, size in ((ROOT / "MSInstanceSaliency/Resources/Icons/MSInstanceSaliency.png", 128), (ROOT / "Resources/MSInstanceSaliency.png", 128)):
        fig = plt.figure(figsize=(1, 1), dpi=size)
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(f, cmap="gray", vmin=np.percentile(f, 1), vmax=np.percentile(f, 99.5))
        rgba = plt.get_cmap("RdBu_r")((s + vmax) / (2 * vmax))
        rgba[..., 3] = np.clip(np.abs(s) / (0.05 * vmax), 0, 1) * 0.9
        ax.imshow(rgba)
        ax.axis("off")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=size, transparent=False)
        plt.close(fig)
        print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
