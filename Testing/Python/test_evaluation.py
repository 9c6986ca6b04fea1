import numpy as np
import pytest
import torch

from MSInstanceSaliencyLib.evaluation import classify_lesions, dice, evaluate_case, normalized_dice, summarize
from MSInstanceSaliencyLib.instances import label_instances
from MSInstanceSaliencyLib.losses import blob_loss, soft_ndsc_loss


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
