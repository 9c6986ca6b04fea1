"""What torch.compile costs before its first SmoothGrad map: one call of 9 noisy copies (a pass of 8 and a pass of 1,
the two batch shapes a CPU map runs) on a 1-voxel lesion, twice, with the default kernels and compiled
(saliency.kernels). Inductor keeps compiled code on disk; for the cost on a machine that never compiled, run with
its caches empty:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_FX_GRAPH_CACHE=0 .venv/bin/python benchmarks/kernel_compile_time.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from saliency_speed import lesion_of_size  # noqa: E402

from MSInstanceSaliencyLib.io.volumes import array_from_image  # noqa: E402
from MSInstanceSaliencyLib.models.loading import load_model  # noqa: E402
from MSInstanceSaliencyLib.models.preprocessing import prepare_case  # noqa: E402
from MSInstanceSaliencyLib.research.phantom import make_phantom  # noqa: E402
from MSInstanceSaliencyLib.saliency.kernels import kernel_model  # noqa: E402
from MSInstanceSaliencyLib.saliency.smoothgrad import smoothgrad  # noqa: E402


def main():
    model = load_model(None, device="cpu")
    ph = make_phantom(2024, patient=17)
    image = prepare_case(ph.flair, ph.mprage, model.spec).image
    omega = lesion_of_size(image, array_from_image(ph.white_matter) > 0.9, 1)
    for kind in ("default", "compiled"):
        km = kernel_model(model, kind)
        for call in (1, 2):
            t0 = time.perf_counter()
            smoothgrad(km, image, omega, n_samples=9, copies_per_pass=8, device="cpu")
            print(f"{kind:<9} call {call}: {time.perf_counter() - t0:5.1f} s (9 copies, 1 voxel: passes of 8 and 1)", flush=True)


if __name__ == "__main__":
    main()
