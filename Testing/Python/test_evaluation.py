import numpy as np
import pytest
import torch

from MSInstanceSaliencyLib.segmentation.evaluation import classify_lesions, dice, evaluate_case, normalized_dice, summarize
from MSInstanceSaliencyLib.segmentation.instances import label_instances
from MSInstanceSaliencyLib.research.losses import blob_loss, soft_ndsc_loss


def _case():
    gt = np.zeros((20, 20, 20), bool)
    gt[1:4, 1:4, 1:4] = True  # GT A: detected
    gt[10:12, 10:12, 10:12] = True  # GT B: missed (FN)
    gt[15:17, 1:3, 1:3] = True  # GT C and D, both touched by one prediction
    gt[15:17, 5:7, 1:3] = True
    pred = np.zeros_like(gt)
    pred[2:5, 2:5, 2:5] = True  # TP (overlaps A)
    pred[1:3, 15:18, 15:18] = True  # FP
    pred[15:17, 2:6, 1:3] = True  # TP touching C and D
    return label_instances(pred, min_volume_mm3=0), gt


def test_lesion_categories_by_hand():
    pred, gt = _case()
    c = classify_lesions(pred, gt)
    assert len(c["tp"]) == 2 and len(c["fp"]) == 1 and len(c["fn"]) == 1
    assert c["n_gt"] == 4 and c["gt_detected"] == 3
    m = evaluate_case(pred, gt)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["ppv"] == pytest.approx(2 / 3)
    assert m["tpr"] == pytest.approx(3 / 4)


def test_dice_and_ndsc_by_hand():
    pred, gt = _case()
    p, g = pred > 0, gt
    tp, fp, fn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum()
    assert dice(p, g) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    k = (1 - 0.001) * g.sum() / (0.001 * (g.size - g.sum()))
    assert normalized_dice(p, g) == pytest.approx(2 * tp / (k * fp + 2 * tp + fn))
    assert normalized_dice(np.zeros_like(g), np.zeros_like(g)) == 1.0


def test_summary_sums_counts():
    pred, gt = _case()
    one = evaluate_case(pred, gt)
    s = summarize([one, one])
    assert (s["tp"], s["fp"], s["fn"]) == (4, 2, 2)
    assert s["f1"] == pytest.approx(one["f1"])


def test_soft_ndsc_loss_equals_metric_on_binary_input():
    pred, gt = _case()
    loss = soft_ndsc_loss(torch.from_numpy((pred > 0).astype(np.float32)), torch.from_numpy(gt.astype(np.float32)))
    assert 1 - loss.item() == pytest.approx(normalized_dice(pred > 0, gt), rel=1e-5)


def test_blob_loss_masks_other_instances():
    inst = torch.zeros(10, 10, 10, dtype=torch.long)
    inst[1:3, 1:3, 1:3] = 1
    inst[6:8, 6:8, 6:8] = 2
    prob = torch.zeros(10, 10, 10)
    prob[1:3, 1:3, 1:3] = 1.0  # instance 1 perfect, instance 2 missed
    loss = blob_loss(prob, inst)
    # instance 1 alone: perfect (0); instance 2 alone: nothing predicted where valid (1) -> mean 0.5
    assert loss.item() == pytest.approx(0.5, abs=1e-4)


# ----------------------------------------------------------------------------- `msis evaluate`: label values of any size

def _evaluate(tmp_path, capsys, pred, gt, name):
    """`msis evaluate` of arrays written as NIfTI: (exit code, metrics or the error line)."""
    import json

    import SimpleITK as sitk

    from MSInstanceSaliencyLib.cli import main

    paths = []
    for what, a in ((f"{name}_pred", pred), (f"{name}_gt", gt)):
        paths.append(tmp_path / f"{what}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(a), str(paths[-1]))
    capsys.readouterr()
    rc = main(["evaluate", *map(str, paths), "--json", str(tmp_path / f"{name}.json")])
    err = capsys.readouterr().err.strip().splitlines()
    if rc:
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"msis: error: prediction {paths[0]}"), err
        return rc, err[0]
    return rc, json.loads((tmp_path / f"{name}.json").read_text())


def _relabelled(pred, values, dtype):
    """The same prediction with labels 1..n replaced by `values` (in that order) as `dtype`."""
    out = np.zeros(pred.shape, dtype)
    for k, v in enumerate(values, start=1):
        out[pred == k] = v
    return out


@pytest.mark.parametrize("dtype, values", [
    (np.uint32, [4_000_000_000, 1, 300_000_000]),
    (np.int64, [2**62, 7, 2**40]),
    (np.uint64, [2**64 - 1, 2**63, 5]),
    (np.float32, [1e6, 2, 3]),  # whole numbers stored as floats are labels too
    (np.int16, [3, 1, 2]),  # labels in another order
])
def test_evaluate_takes_labels_of_any_size(tmp_path, capsys, dtype, values):
    """Counts and Dice as for the prediction labelled 1..n, with memory that follows the voxels (20^3), not
    the largest label (a 4e9 label asked numpy for 30 GiB, 2^62 was an internal error)."""
    import tracemalloc

    pred, gt = _case()
    assert pred.max() == len(values)
    rc, reference = _evaluate(tmp_path, capsys, pred.astype(np.uint8), gt.astype(np.uint8), "reference")
    assert rc == 0 and (reference["tp"], reference["fp"], reference["fn"]) == (2, 1, 1)
    tracemalloc.start()
    try:
        rc, m = _evaluate(tmp_path, capsys, _relabelled(pred, values, dtype), gt.astype(np.uint8), "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 0, m
    assert m == reference
    assert peak < 50e6, peak


def test_counting_memory_follows_the_labels_present():
    """classify_lesions (Python): the ids it returns are the labels given, however large; memory is bounded."""
    import tracemalloc

    pred, gt = _case()
    big = _relabelled(pred, [30_000_000, 2**40, 12], np.int64)  # a bincount up to 30e6 alone would take 240 MB
    tracemalloc.start()
    try:
        c = classify_lesions(big, gt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    small = classify_lesions(pred, gt)
    values = {1: 30_000_000, 2: 2**40, 3: 12}
    assert sorted(c["tp"]) == sorted(values[i] for i in small["tp"]) and c["fp"] == [values[i] for i in small["fp"]]
    assert (c["fn"], c["gt_detected"], c["n_gt"]) == (small["fn"], small["gt_detected"], small["n_gt"])
    assert peak < 20e6, peak


@pytest.mark.parametrize("values, dtype, fragment", [
    ([-1, 2, 3], np.int16, "negative labels (such as -1)"),
    ([-(2**40), 5, 6], np.int64, "negative labels"),
    ([0.25, 0.5, 1.0], np.float32, "not all of them whole numbers (such as 0.25)"),
    ([1.0, np.nan, 2.0], np.float64, "NaN or Inf"),
    ([1.0, np.inf, 2.0], np.float32, "NaN or Inf"),
])
def test_evaluate_refuses_what_is_not_labels(tmp_path, capsys, values, dtype, fragment):
    pred, gt = _case()
    rc, err = _evaluate(tmp_path, capsys, _relabelled(pred, values, dtype), gt.astype(np.uint8), "bad")
    assert rc == 2 and fragment in err, err


@pytest.mark.parametrize("value, dtype", [(0.5, np.float32), (-1, np.int8), (3_000_000_000, np.uint32)])
def test_evaluate_takes_a_mask_of_any_one_value(tmp_path, capsys, value, dtype):
    """One non-zero value, whatever it is, is a binary mask: its connected components are the lesions."""
    pred, gt = _case()
    rc, reference = _evaluate(tmp_path, capsys, (pred > 0).astype(np.uint8), gt.astype(np.uint8), "mask")
    rc, m = _evaluate(tmp_path, capsys, np.where(pred > 0, value, 0).astype(dtype), gt.astype(np.uint8), "valued")
    assert rc == 0 and m == reference and m["n_pred"] == 3


def test_touching_instances_stored_as_floats_stay_apart(tmp_path, capsys):
    """Labels 1.0 and 2.0 on two halves of one blob are two lesions, as the same labels stored as integers
    (they were read as one binary mask, and the halves merged)."""
    pred, gt = _case()
    split = pred.astype(np.int16)
    split[2:3, 2:5, 2:5][split[2:3, 2:5, 2:5] > 0] = 4  # the first TP's first slab: a fourth lesion touching it
    rc, as_int = _evaluate(tmp_path, capsys, split, gt.astype(np.uint8), "int")
    rc2, as_float = _evaluate(tmp_path, capsys, split.astype(np.float32), gt.astype(np.uint8), "float")
    assert (rc, rc2) == (0, 0) and as_float == as_int and (as_int["tp"], as_int["n_pred"]) == (3, 4)
