"""Training losses of the paper's U-Net: normalised Dice plus blob loss (METHOD.md).

- Normalised Dice (nDSC, Raina et al. 2023): Dice with false positives rescaled by
  k = (1 - r) * |G| / (r * (|V| - |G|)) so the score does not depend on lesion load; r = 0.001.
- Blob loss (Kofler et al. 2023): the same loss per ground-truth instance, computed with the other
  instances masked out, averaged over instances, so small lesions weigh as much as large ones.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def soft_ndsc_loss(prob: torch.Tensor, target: torch.Tensor, r: float = 0.001, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft nDSC of one sample; prob and target are same-shape float tensors, valid a 0/1 mask."""
    if valid is not None:
        prob = prob * valid
        target = target * valid
        n_vox = valid.sum()
    else:
        n_vox = torch.tensor(float(target.numel()), device=target.device)
    g = target.sum()
    tp = (prob * target).sum()
    fp = (prob * (1 - target)).sum()
    fn = ((1 - prob) * target).sum()
    if g > 0:
        k = (1 - r) * g / (r * torch.clamp(n_vox - g, min=1.0))
    else:  # nDSC is undefined without lesions; fall back to plain Dice so FPs still cost
        k = torch.ones((), device=prob.device)
    return 1 - (2 * tp + EPS) / (k * fp + 2 * tp + fn + EPS)


def blob_loss(prob: torch.Tensor, instances: torch.Tensor, r: float = 0.001) -> torch.Tensor | None:
    """Mean over GT instances of the nDSC loss with all other instances masked out; None without instances."""
    ids = torch.unique(instances)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return None
    losses = []
    for i in ids:
        own = (instances == i).float()
        valid = ((instances == 0) | (instances == i)).float()
        losses.append(soft_ndsc_loss(prob, own, r=r, valid=valid))
    return torch.stack(losses).mean()


def ndsc_blob_loss(logits: torch.Tensor, instances: torch.Tensor, alpha: float = 2.0, beta: float = 1.0) -> torch.Tensor:
    """alpha * global nDSC loss + beta * blob loss, averaged over the batch.

    logits: (B, 2, X, Y, Z); instances: (B, X, Y, Z) integer instance labels (0 = background).
    """
    prob = torch.softmax(logits, dim=1)[:, 1]
    total = []
    for b in range(prob.shape[0]):
        target = (instances[b] > 0).float()
        loss = alpha * soft_ndsc_loss(prob[b], target)
        blob = blob_loss(prob[b], instances[b])
        if blob is not None:
            loss = loss + beta * blob
        total.append(loss)
    return torch.stack(total).mean()
