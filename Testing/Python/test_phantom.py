import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MSInstanceSaliencyLib.phantom import make_phantom, patient_mask_path
from MSInstanceSaliencyLib.volumes import array_from_image, same_grid


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
    # background (outside the head) is dark in both
    assert np.median(flair[~brain]) < 0.3 * np.median(flair[wm])
    assert ph.info["n_lesions"] > 0 and les.sum() > 0


def test_gm_brighter_than_wm_on_flair_at_1mm():
    ph = make_phantom(11, patient=5)
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


def test_seed_determinism_and_variety():
    a = make_phantom(3, patient=2, voxel_size=2.0)
    b = make_phantom(3, patient=2, voxel_size=2.0)
    c = make_phantom(4, patient=2, voxel_size=2.0)
    np.testing.assert_array_equal(array_from_image(a.flair), array_from_image(b.flair))
    assert not np.array_equal(array_from_image(a.lesions), array_from_image(c.lesions))  # different deformation


def test_lesion_mask_argument_places_those_lesions(tmp_path):
    """A mask in MNI space (FSL grid) with two cubes: the phantom's ground truth has those two lesions."""
    ref = sitk.ReadImage(str(patient_mask_path(1)))
    a = np.zeros(ref.GetSize()[::-1], np.uint8)  # (z, y, x)
    a[70:76, 120:126, 60:66] = 1
    a[80:85, 100:105, 110:115] = 1
    m = sitk.GetImageFromArray(a)
    m.CopyInformation(ref)
    sitk.WriteImage(m, str(tmp_path / "two.nii.gz"))
    ph = make_phantom(1, tmp_path / "two.nii.gz")
    lab, n = ndimage.label(array_from_image(ph.lesions, np.uint8), structure=np.ones((3, 3, 3)))
    assert n == 2
    sizes = sorted(np.bincount(lab.ravel())[1:])
    assert 0.6 * 125 < sizes[0] < 1.5 * 216 and 0.6 * 125 < sizes[1] < 1.5 * 216
    # the cubes' world centres are preserved up to the few-mm deformation
    for k in (1, 2):
        c = ndimage.center_of_mass(lab == k)
        p = np.array(ph.lesions.TransformContinuousIndexToPhysicalPoint([float(x) for x in c]))
        centres = [np.array(ref.TransformContinuousIndexToPhysicalPoint([62.5, 122.5, 72.5])),
                   np.array(ref.TransformContinuousIndexToPhysicalPoint([112.0, 102.0, 82.0]))]
        assert min(np.linalg.norm(p - q) for q in centres) < 5.0
