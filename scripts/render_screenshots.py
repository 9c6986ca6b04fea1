"""Screenshots of the module's slice views, rendered offscreen by Slicer's own MRML and logic libraries.

    .venv/bin/python scripts/render_screenshots.py [--out docs/screenshots] [--cache DIR]

Makes a phantom case, segments it with the bundled demo model, computes one lesion's SmoothGrad map
(FLAIR channel), builds the scene the module builds (FLAIR background, the saliency map as the
foreground at opacity 0.5 with the module's colour table, the lesion segments with the picked one
outlined, as the module shows them with a map) with the module's MRML adapter, and renders the axial, coronal and sagittal slice
views through the lesion, centred on it and zoomed in, with slicer-core
(Testing/Python/slice_rendering.py: the slice logic's blended layers plus the segmentations
displayable manager, VTK's offscreen EGL window). Writes slicer_axial.png, slicer_coronal.png,
slicer_sagittal.png and slicer_views.png (side by side).

--cache DIR keeps the case and the map (NIfTI) there and reuses them on the next run, so only the
rendering is redone. With the defaults (N=10, the max over 32 of the lesion's voxels) about 30 s on
2 CPU cores (phantom 11 s, segmentation 10 s, SmoothGrad 7 s, rendering 0.2 s); the max over all
of the lesion's voxels (the module's default, with N=50 there) shows the whole lesion but took
5-6 minutes here. The images in docs/screenshots were made with

    .venv/bin/python scripts/render_screenshots.py --max-omega-voxels 256 --cache .cache/screenshots
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "MSInstanceSaliency", ROOT / "Testing" / "Python"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import slice_rendering as sr  # noqa: E402  (sets VTK's offscreen window before vtk is used)

from MSInstanceSaliencyLib.io.volumes import array_from_image, image_from_array  # noqa: E402

CASE_FILES = ("flair", "mprage", "labels", "saliency")


def compute_case(args) -> dict:
    """{flair, mprage, labels, saliency: SimpleITK images, lesion_id, ...}: phantom, segmentation, SmoothGrad."""
    from MSInstanceSaliencyLib.saliency.explain import explain, omega_from_lesion
    from MSInstanceSaliencyLib.models.loading import load_model
    from MSInstanceSaliencyLib.research.phantom import make_phantom
    from MSInstanceSaliencyLib.segmentation.pipeline import segment

    t0 = time.time()
    ph = make_phantom(args.seed, patient=args.patient)
    print(f"phantom (seed {args.seed}, patient {args.patient}): {time.time() - t0:.0f} s", file=sys.stderr)
    model = load_model(device="cpu")
    result = segment(ph.flair, ph.mprage, model, device="cpu")
    print(f"segmented, {len(result.table)} lesions: {time.time() - t0:.0f} s", file=sys.stderr)
    if not result.table:
        raise SystemExit("the model found no lesion in this phantom: try another --seed")
    lesion = args.lesion or max(result.table, key=lambda r: r["voxels"])["lesion_id"]  # the largest: easiest to see
    t1 = time.time()
    exp = explain(model, result.prepared.image, omega_from_lesion(result.labels, lesion), "smoothgrad",
                  channels=result.prepared.channels, n_samples=args.samples, aggregation="max", context="patch",
                  max_omega_voxels=args.max_omega_voxels, device="cpu")
    print(f"SmoothGrad of lesion {lesion} (N={args.samples}, max over <= {args.max_omega_voxels} voxels): "
          f"{time.time() - t1:.0f} s", file=sys.stderr)
    ref = result.reference
    return {
        "flair": ph.flair, "mprage": ph.mprage,
        "labels": image_from_array(result.labels.astype(np.int32), reference=ref),
        "saliency": image_from_array(exp.maps["flair"].astype(np.float32), reference=ref),
        "lesion_id": int(lesion), "seed": args.seed, "patient": args.patient, "samples": args.samples,
        "max_omega_voxels": args.max_omega_voxels,
    }


def load_or_compute(args) -> dict:
    cache = Path(args.cache) if args.cache else None
    if cache and (cache / "case.json").is_file():
        case = json.loads((cache / "case.json").read_text())
        case.update({k: sitk.ReadImage(str(cache / f"{k}.nii.gz")) for k in CASE_FILES})
        print(f"case from {cache} (lesion {case['lesion_id']})", file=sys.stderr)
        return case
    case = compute_case(args)
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        for k in CASE_FILES:
            sitk.WriteImage(case[k], str(cache / f"{k}.nii.gz"), useCompression=True)
        (cache / "case.json").write_text(json.dumps({k: v for k, v in case.items() if k not in CASE_FILES}, indent=1))
    return case


def build_scene(case):
    """The module's scene, made with its MRML adapter: returns (app logic, nodes, RAS of the lesion centre)."""
    import slicer

    import MSInstanceSaliencyMRML as mrml

    slicer.mrmlScene = slicer.vtkMRMLScene()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())
    app = sr.setup_application_logic(slicer.mrmlScene)

    flair = mrml.add_volume(array_from_image(case["flair"]), case["flair"], "FLAIR")
    mprage = mrml.add_volume(array_from_image(case["mprage"]), case["mprage"], "MPRAGE")
    labels = array_from_image(case["labels"]).astype(np.int32)
    segmentation = mrml.labels_to_segmentation(labels, mprage)
    lesion = case["lesion_id"]
    saliency = mrml.add_saliency_volume(array_from_image(case["saliency"]), mprage, f"Lesion {lesion} SmoothGrad FLAIR")
    # the module's lesion highlight with the map shown (MSInstanceSaliencyLogic.showOverlay): the picked lesion as an outline
    sid = mrml.highlight_lesion(segmentation, lesion, overlay_shown=True)
    centre = segmentation.GetSegmentCenterRAS(sid)
    return app, dict(flair=flair, mprage=mprage, saliency=saliency, segmentation=segmentation), centre


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--cache", default=None, help="folder to keep the computed case in and reuse it from")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--patient", type=int, default=18)
    ap.add_argument("--lesion", type=int, default=None, help="lesion to explain (default: the largest)")
    ap.add_argument("--samples", type=int, default=10, help="SmoothGrad N (default 10)")
    ap.add_argument("--max-omega-voxels", type=int, default=32, help="the max over at most this many lesion voxels (default 32)")
    ap.add_argument("--size", type=int, default=400, help="pixels per view (square; default 400)")
    ap.add_argument("--opacity", type=float, default=0.5, help="foreground opacity (the module's default 0.5)")
    ap.add_argument("--zoom", type=float, default=3.0, help="zoom after fitting the brain, centred on the lesion (default 3)")
    args = ap.parse_args(argv)

    t0 = time.time()
    case = load_or_compute(args)
    app, nodes, centre = build_scene(case)
    if not sr.opengl_available():
        print(f"no offscreen OpenGL: segments are left out (apt-get install {sr.OPENGL_PACKAGES})", file=sys.stderr)
    t1 = time.time()
    # centred on the lesion as the module's JumpSlicesToLocation(..., True) does, zoomed in as a reader would
    views = sr.render_views(app, nodes["flair"], nodes["saliency"], args.opacity, ras=centre, size=(args.size, args.size),
                            zoom=args.zoom, center=True)
    print(f"rendered {len(views)} views in {time.time() - t1:.1f} s", file=sys.stderr)
    out = Path(args.out)
    for name, image in views.items():
        print(sr.save_png(image, out / f"slicer_{name.lower()}.png"))
    print(sr.save_png(sr.side_by_side(list(views.values())), out / "slicer_views.png"))
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
