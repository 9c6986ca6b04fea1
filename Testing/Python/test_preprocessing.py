import numpy as np
import pytest
import SimpleITK as sitk

from MSInstanceSaliencyLib.errors import InputError
from MSInstanceSaliencyLib.preprocessing import n4_correct, prepare_case, register_rigid
from MSInstanceSaliencyLib.volumes import array_from_image, same_grid


def test_same_grid_used_as_is_and_zscored(small_phantom):
    p = prepare_case(small_phantom.flair, small_phantom.mprage)
    assert p.image.shape == (2,) + small_phantom.flair.GetSize()
    assert p.image.dtype == np.float32
    for c in range(2):
        assert abs(p.image[c].mean()) < 1e-4 and abs(p.image[c].std() - 1) < 1e-3
    assert not any("resampled" in s for s in p.steps)


def test_flair_on_other_grid_is_resampled_onto_mprage(small_phantom):
    flair = small_phantom.flair
    coarse = sitk.Resample(flair, [s // 2 for s in flair.GetSize()], sitk.Transform(), sitk.sitkLinear,
                           flair.GetOrigin(), [s * 2 for s in flair.GetSpacing()], flair.GetDirection(), 0.0, sitk.sitkFloat32)
    p = prepare_case(coarse, small_phantom.mprage)
    assert same_grid(p.flair_on_reference, small_phantom.mprage)
    assert p.image.shape[1:] == small_phantom.mprage.GetSize()
    assert any("resampled" in s for s in p.steps)


def test_non_overlapping_volumes_rejected(small_phantom):
    far = sitk.Image(small_phantom.flair)
    far.SetOrigin([o + 1000.0 for o in far.GetOrigin()])
    with pytest.raises(InputError, match="do not overlap"):
        prepare_case(far, small_phantom.mprage)


@pytest.mark.parametrize("value,match", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf")])
def test_nan_inf_rejected(small_phantom, value, match):
    a = sitk.GetArrayFromImage(small_phantom.flair)
    a[10, 10, 10] = value
    bad = sitk.GetImageFromArray(a)
    bad.CopyInformation(small_phantom.flair)
    with pytest.raises(InputError, match=match):
        prepare_case(bad, small_phantom.mprage)


def test_empty_and_constant_rejected(small_phantom):
    zero = sitk.Image(small_phantom.mprage.GetSize(), sitk.sitkFloat32)
    zero.CopyInformation(small_phantom.mprage)
    with pytest.raises(InputError, match="MPRAGE is empty"):
        prepare_case(small_phantom.flair, zero)
    const = zero + 5.0
    with pytest.raises(InputError, match="FLAIR is constant"):
        prepare_case(const, small_phantom.mprage)


def test_rigid_registration_recovers_a_shift(small_phantom):
    fixed = small_phantom.mprage
    t = sitk.TranslationTransform(3, (4.0, -6.0, 2.0))
    moving = sitk.Resample(fixed, fixed, t, sitk.sitkLinear, 0.0)
    moving.SetOrigin(tuple(np.array(moving.GetOrigin()) + 0.0))
    found = register_rigid(fixed, moving)
    # mapping a point through the found transform should land where the true shift puts it
    p = np.array(fixed.TransformContinuousIndexToPhysicalPoint([40.0, 50.0, 40.0]))
    err = np.linalg.norm(np.array(found.TransformPoint(p.tolist())) - np.array(t.GetInverse().TransformPoint(p.tolist())))
    assert err < 1.5  # mm, on a 2 mm grid


def test_n4_reduces_a_bias_field(small_phantom):
    img = sitk.Cast(small_phantom.mprage, sitk.sitkFloat32)
    size = np.array(img.GetSize())
    x = np.linspace(-1, 1, size[0])[:, None, None]
    field = np.exp(0.4 * x) * np.ones(tuple(size))
    biased = sitk.GetImageFromArray((array_from_image(img) * field).transpose(2, 1, 0).astype(np.float32))
    biased.CopyInformation(img)
    brain = array_from_image(small_phantom.white_matter) > 0.9
    def left_right_ratio(a):
        half = a.shape[0] // 2
        return np.median(a[:half][brain[:half]]) / np.median(a[half:][brain[half:]])
    before = abs(np.log(left_right_ratio(array_from_image(biased))))
    after = abs(np.log(left_right_ratio(array_from_image(n4_correct(biased, shrink=2)))))
    assert after < 0.5 * before
