"""Checks of the parsed arguments that argparse cannot make alone, run before any work starts."""

from __future__ import annotations

from ..errors import InputError


MIN_SIZE_REGISTER_N4 = 16


def _check_args(args) -> None:
    """What argparse cannot check alone, before any work starts (InputError, one line)."""
    if args.command in ("explain", "demo"):
        _check_explain_args(args)
    if args.command in ("context", "sanity", "stats") and args.manifest is None and (args.workers or args.scheduler):
        raise InputError(f"{'--workers' if args.workers else '--scheduler'} goes with --manifest (a set of cases on dask)")
    if args.command in ("context", "sanity", "stats") and args.manifest is not None:
        given = [f for f, v in (("--flair", args.flair), ("--mprage", args.mprage), ("--gt", args.gt), ("--wm", getattr(args, "wm", None)),
                                ("--lesion", getattr(args, "lesion", None))) if v]
        if given:
            raise InputError(f"--manifest takes every case's files from the CSV (a wm column for white matter; the lesion is chosen per "
                             f"case): leave out {', '.join(given)}")
    if args.command in ("cohort", "context", "sanity", "stats") and args.scheduler and args.workers:
        raise InputError("--workers sizes the local cluster; with --scheduler the cluster you started decides (drop --workers)")
    if args.command == "context" and args.size_range[0] > args.size_range[1]:
        raise InputError(f"--size-range MIN MAX: MIN ({args.size_range[0]}) is larger than MAX ({args.size_range[1]})")
    if args.command == "segment" and (args.tp_probability or args.prune_below is not None) or (
            args.command == "demo" and not args.no_tp_probability and args.classifier):
        try:
            from ..classifier.scoring import load_classifier

            load_classifier(args.classifier)  # a broken classifier is refused now, not after the segmentation
        except ImportError as exc:
            raise InputError(f"the TP probability needs {exc.name or 'pyradiomics'}, which is not installed here "
                             "(in 3D Slicer it comes with the optional SlicerRadiomics extension); run without --tp-probability (demo: with "
                             "--no-tp-probability)") from None


def _check_register_size(images, args) -> None:
    """Registration (shrink factors 4, 2, 1 and 5% sampling) and N4 (on a 4x shrunk copy) fail inside
    ITK on images this small; refuse them with the reason instead."""
    flags = [f for f, on in (("--register", getattr(args, "register", False)), ("--n4", getattr(args, "n4", False))) if on]
    if not flags:
        return
    for what, img in images:
        if min(img.GetSize()[:3]) < MIN_SIZE_REGISTER_N4:
            raise InputError(f"{' and '.join(flags)} need at least {MIN_SIZE_REGISTER_N4} voxels along each axis; {what} has size "
                             f"{tuple(img.GetSize())}. Run without {' and '.join(flags)} or on the full volumes")


_EXPLAIN_FLAGS = {"n_samples": "--samples", "seed": "--noise-seed", "lesion_id": "--lesion", **{
    a: "--" + a.replace("_", "-") for a in ("method", "sigma", "sigma_mode", "aggregation", "context", "precision", "max_omega_voxels")}}


def _check_explain_args(args, omega=None) -> None:
    """The explain arguments through the checks every entry point shares (explain.check_explain_args);
    with Ω also SmoothGrad's cost, refused above MAX_BACKWARD_PASSES before it starts."""
    from ..saliency.explain import check_explain_args

    check_explain_args(getattr(args, "method", "smoothgrad"), n_samples=args.samples, sigma=args.sigma, sigma_mode=args.sigma_mode,
                       aggregation=args.aggregation, context=args.context, seed=args.noise_seed, precision=args.precision,
                       max_omega_voxels=args.max_omega_voxels, omega=omega, names=_EXPLAIN_FLAGS)
