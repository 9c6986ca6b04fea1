import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MSInstanceSaliencyLib.research.phantom import make_phantom, patient_mask_path
from MSInstanceSaliencyLib.io.volumes import array_from_image, same_grid

from test_outputs import assert_failed_rewrite_keeps_the_file


def test_images_share_one_grid(small_phantom):
    ph = small_phantom
    for name in ("mprage", "lesions", "mimics", "white_matter", "brain_mask"):
        assert same_grid(getattr(ph, name), ph.flair), name
    assert ph.flair.GetSpacing() == (2.0, 2.0, 2.0)


def test_contrasts(small_phantom):
    ph = small_phantom
    flair, t1 = array_from_image(ph.flair), array_from_image(ph.mprage)
    les = array_from_image(ph.lesions, np.uint8) > 0
    wm = (array_from_image(ph.white_matter) > 0.9) & ~ndimage.binary_dilation(les, iterations=2)
    brain = array_from_image(ph.brain_mask, np.uint8) > 0
    core = ndimage.binary_erosion(les)
    core = core if core.sum() > 5 else les
    # FLAIR: lesions bright, above white matter; MPRAGE: white matter bright, lesions darker
    assert np.median(flair[core]) > 1.3 * np.median(flair[wm])
    assert np.median(t1[core]) < 0.9 * np.median(t1[wm])
    # air around the head is dark in both
    air = ~brain & (array_from_image(ph.head, np.uint8) == 0)
    assert np.median(flair[air]) < 0.3 * np.median(flair[wm]) and np.median(t1[air]) < 0.3 * np.median(t1[wm])
    assert ph.info["n_lesions"] > 0 and les.sum() > 0


@pytest.fixture(scope="module")
def phantoms_2mm(small_phantom):
    """2 mm phantoms of patient 3 by seed, each made once for this module (seed 7 is conftest's small_phantom)."""
    made = {7: small_phantom}

    def get(seed):
        if seed not in made:
            made[seed] = make_phantom(seed, patient=3, voxel_size=2.0)
        return made[seed]
    return get


def test_seed_determinism_and_variety(phantoms_2mm):
    """The same seed gives the same phantom (a fresh one against one made earlier in this process, after
    other phantoms), another seed another deformation."""
    a = phantoms_2mm(7)
    b = make_phantom(7, patient=3, voxel_size=2.0)
    c = phantoms_2mm(8)
    np.testing.assert_array_equal(array_from_image(a.flair), array_from_image(b.flair))
    np.testing.assert_array_equal(array_from_image(a.lesions), array_from_image(b.lesions))
    assert not np.array_equal(array_from_image(a.lesions), array_from_image(c.lesions))  # different deformation


def test_lesion_mask_argument_places_those_lesions(tmp_path):
    """A mask in MNI space (FSL grid) with two cubes: the phantom's ground truth has those two lesions, of
    their volumes, where they were. At 2 mm (the mask is resampled like at 1 mm), so cubes of 8 and 10 mm."""
    ref = sitk.ReadImage(str(patient_mask_path(1)))
    a = np.zeros(ref.GetSize()[::-1], np.uint8)  # (z, y, x)
    a[70:80, 120:130, 60:70] = 1
    a[82:90, 100:108, 110:118] = 1
    m = sitk.GetImageFromArray(a)
    m.CopyInformation(ref)
    sitk.WriteImage(m, str(tmp_path / "two.nii.gz"))
    ph = make_phantom(1, tmp_path / "two.nii.gz", voxel_size=2.0)
    lab, n = ndimage.label(array_from_image(ph.lesions, np.uint8), structure=np.ones((3, 3, 3)))
    assert n == 2
    sizes = sorted(np.bincount(lab.ravel())[1:])
    for size, cube_mm3 in zip(sizes, (8 ** 3, 10 ** 3)):  # in voxels of 8 mm³
        assert 0.6 * cube_mm3 / 8 < size < 1.5 * cube_mm3 / 8, sizes
    # the cubes' world centres are preserved up to the few-mm deformation
    centres = [np.array(ref.TransformContinuousIndexToPhysicalPoint([64.5, 124.5, 74.5])),
               np.array(ref.TransformContinuousIndexToPhysicalPoint([113.5, 103.5, 85.5]))]
    for k in (1, 2):
        c = ndimage.center_of_mass(lab == k)
        p = np.array(ph.lesions.TransformContinuousIndexToPhysicalPoint([float(x) for x in c]))
        assert min(np.linalg.norm(p - q) for q in centres) < 5.0


def test_skull_stripped_phantoms_are_the_earlier_kind():
    """skull_stripped=True draws the same numbers as before the head existed: figures recorded from the
    generator of commit 955b5f3 (sum of intensities, lesion and mimic voxel counts)."""
    ph = make_phantom(3, patient=2, voxel_size=2.0, skull_stripped=True)
    assert ph.head is None and ph.flair.GetSize() == (80, 98, 82)
    f, t1 = (array_from_image(getattr(ph, n)).astype(np.float64) for n in ("flair", "mprage"))
    assert f.sum() == pytest.approx(120781002.454, rel=1e-6) and t1.sum() == pytest.approx(174950448.787, rel=1e-6)
    assert array_from_image(ph.lesions, np.uint8).sum() == 97 and array_from_image(ph.mimics, np.uint8).sum() == 40


@pytest.fixture(scope="module")
def head_phantom():
    return make_phantom(12000, patient=20)


def test_head_layers_have_their_tissues_brightness(head_phantom):
    """From the brain outwards: CSF dark on FLAIR, cortical bone dark on both, marrow and scalp fat bright on
    both (FLAIR without fat suppression), then air."""
    ph = head_phantom
    flair, t1 = array_from_image(ph.flair), array_from_image(ph.mprage)
    head = array_from_image(ph.head, np.uint8)
    wm = (array_from_image(ph.white_matter) > 0.95) & (array_from_image(ph.mimics, np.uint8) == 0)
    fw, tw = np.median(flair[wm]), np.median(t1[wm])
    med = {k: (np.median(flair[head == k]) / fw, np.median(t1[head == k]) / tw) for k in range(1, 7)}
    csf, inner, marrow, outer, fat, skin = (med[k] for k in range(1, 7))
    assert csf[0] < 0.6 and inner[0] < 0.4 and inner[1] < 0.4 and outer[1] < 0.4
    assert marrow[0] > 0.8 and marrow[1] > 0.6 and fat[0] > 1.3 and fat[1] > 1.0 and fat[0] > skin[0]
    # every layer is present all around the brain: each takes a shell of a few mm
    assert all((head == k).sum() > 20_000 for k in range(1, 7))


def test_normal_hyperintensities_are_bright_and_marked_as_mimics(head_phantom):
    """Periventricular caps/rims, septum, choroid plexus and CSF inflow are in the mimics mask (potential
    FPs, not lesions) and brighter than white matter on FLAIR."""
    ph = head_phantom
    flair = array_from_image(ph.flair)
    mim = array_from_image(ph.mimics, np.uint8) > 0
    les = array_from_image(ph.lesions, np.uint8) > 0
    wm = (array_from_image(ph.white_matter) > 0.95) & ~mim & ~ndimage.binary_dilation(les, iterations=2)
    assert not (mim & les).any()
    assert mim.sum() > 1000  # the normal hyperintensities add far more than the small mimics
    assert np.median(flair[mim]) > 1.1 * np.median(flair[wm])


def test_gm_brighter_than_wm_on_flair_at_1mm(head_phantom):
    ph = head_phantom
    flair = array_from_image(ph.flair)
    wm = array_from_image(ph.white_matter)
    brain = array_from_image(ph.brain_mask, np.uint8) > 0
    les = array_from_image(ph.lesions, np.uint8) > 0
    mim = array_from_image(ph.mimics, np.uint8) > 0
    healthy = brain & ~ndimage.binary_dilation(les | mim, iterations=2)
    # GM proxy: brain voxels with little WM but bright enough not to be CSF
    gmish = healthy & (wm < 0.1) & (flair > 0.4 * flair[healthy & (wm > 0.9)].mean())
    assert np.median(flair[gmish]) > np.median(flair[healthy & (wm > 0.95)])
    assert mim.sum() > 0  # mimics exist, so a model can make false positives


def test_lesion_contrast_ranges_from_subtle_to_bright(head_phantom):
    ph = head_phantom
    flair, t1 = array_from_image(ph.flair), array_from_image(ph.mprage)
    lab, n = ndimage.label(array_from_image(ph.lesions, np.uint8), structure=np.ones((3, 3, 3)))
    wm = array_from_image(ph.white_matter) > 0.95
    fw, tw = np.median(flair[wm]), np.median(t1[wm])
    ratios = []
    for k, box in enumerate(ndimage.find_objects(lab), start=1):
        # eroded within the lesion's box plus one voxel: the same core as over the whole volume, far faster
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        core = ndimage.binary_erosion(lab[box] == k)
        if core.sum() >= 8:
            ratios.append((np.median(flair[box][core]) / fw, np.median(t1[box][core]) / tw))
    f = [r[0] for r in ratios]
    t = [r[1] for r in ratios]
    assert len(ratios) >= 5 and min(f) < 1.6 and max(f) > 1.9  # subtle (grey-matter-like) to bright
    assert max(t) > 0.85 and min(t) < 0.7  # iso- to hypo-intense on T1


def test_scans_differ_in_contrast_bias_and_noise(phantoms_2mm):
    """Across seeds the z-scored white matter and lesion levels move: intensity alone is not the answer."""
    from MSInstanceSaliencyLib.models.preprocessing import normalize

    levels = []
    for seed in (5, 6, 7, 8):
        ph = phantoms_2mm(seed)
        f = normalize(array_from_image(ph.flair))
        wm = array_from_image(ph.white_matter) > 0.95
        levels.append(float(np.median(f[wm])))
    assert max(levels) - min(levels) > 0.15


def test_phantom_voxel_size_one_way(tmp_path, monkeypatch, capsys):
    """`msis phantom`: --voxel-size, else MSIS_PHANTOM_VOXEL_SIZE (as for `features --phantom-patients`), else 1 mm."""
    from MSInstanceSaliencyLib.cli import main

    def spacing(*argv):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        assert main(["phantom", "--out", str(out), "--seed", "1", "--patient", "2", *argv]) == 0
        return sitk.ReadImage(str(out / "flair.nii.gz")).GetSpacing()

    monkeypatch.setenv("MSIS_PHANTOM_VOXEL_SIZE", "4")
    assert spacing() == (4.0, 4.0, 4.0)
    assert spacing("--voxel-size", "3.5") == (3.5, 3.5, 3.5)  # the flag wins
    for bad in ("abc", "0.3", "nan", "8"):
        monkeypatch.setenv("MSIS_PHANTOM_VOXEL_SIZE", bad)
        capsys.readouterr()
        assert main(["phantom", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "MSIS_PHANTOM_VOXEL_SIZE must be a voxel size in mm between 0.5 and 4" in err[0], err
        assert not (tmp_path / "bad").exists()
    assert spacing("--voxel-size", "4") == (4.0, 4.0, 4.0)  # a bad variable is not read when the flag is given
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["phantom", "--help"])
    assert "MSIS_PHANTOM_VOXEL_SIZE" in " ".join(capsys.readouterr().out.split())


def test_a_failed_phantom_save_keeps_the_earlier_images(small_phantom, tmp_path):
    paths = small_phantom.save(tmp_path)
    assert set(paths) == {"flair", "mprage", "lesions", "mimics", "head"} - ({"head"} if small_phantom.head is None else set())
    assert_failed_rewrite_keeps_the_file(paths["flair"], lambda: small_phantom.save(tmp_path), n_bytes=paths["flair"].stat().st_size // 2)
    assert same_grid(sitk.ReadImage(str(paths["flair"])), small_phantom.flair)


@pytest.mark.parametrize("n_ctrl, shape, order", [((5, 6, 5), (80, 98, 82), 3), ((3, 3, 3), (47, 58, 49), 3), ((4, 4, 4), (80, 98, 82), 1)])
def test_smooth_fields_equal_scipy_zoom(n_ctrl, shape, order):
    """The phantom's smooth fields are upsampled one axis at a time: the same as ndimage.zoom in one go."""
    from MSInstanceSaliencyLib.research.phantom import _separable_zoom

    coarse = np.random.default_rng(3).normal(0.0, 1.5, n_ctrl)
    zoom = [s / c for s, c in zip(shape, n_ctrl)]
    expected = ndimage.zoom(coarse, zoom, order=order, mode="nearest")
    got = _separable_zoom(coarse, zoom, order)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
