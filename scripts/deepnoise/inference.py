"""Inference shared by validation during training and by ``deepnoise predict``: per-well treatment
probabilities averaged over both sites (and the 8 dihedral views with test-time augmentation)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deepnoise import augment, data, layout


@torch.no_grad()
def predict_probs(
    net: torch.nn.Module,
    batches,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    input_size: int,
    n_treatments: int,
    tta: bool,
    amp: bool = True,
    channels_last: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (n, n_treatments) float32, well indices)`` from ``(uint8 (B, 2, 6, H, W), norm_idx,
    _, index)`` batches; softmax over the treatment logits only."""
    was_training = net.training
    net.eval()
    cuda = device.type == "cuda"
    out, order = [], []
    views = range(layout.TTA_VIEWS) if tta else (0,)
    amp = amp and cuda and torch.cuda.is_bf16_supported()
    for batch in batches:
        x = batch[0].to(device, non_blocking=cuda)
        norm_idx = batch[1].to(device, non_blocking=cuda)
        b = x.shape[0]
        x = data.normalize_batch(x, norm_idx, mean, std)  # (B, 2, 6, H, W)
        x = augment.resize(x.flatten(0, 1), input_size)  # (2B, 6, S, S)
        acc = torch.zeros(b, n_treatments, device=device)
        for k in views:
            v = augment.dihedral(x, k)
            if channels_last and cuda:
                v = v.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(v)
            p = F.softmax(logits.float()[:, :n_treatments], dim=1)
            acc += p.view(b, 2, n_treatments).sum(dim=1)
        out.append((acc / (2 * len(views))).cpu())
        order.append(batch[3])
    net.train(was_training)
    if not out:
        return np.zeros((0, n_treatments), np.float32), np.zeros(0, np.int64)
    return torch.cat(out).numpy().astype(np.float32), torch.cat(order).numpy()


def accuracy(probs: np.ndarray, order: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``probs`` (rows = ``labels[order]``); NaN for no rows."""
    if len(order) == 0:
        return float("nan")
    return float((probs.argmax(axis=1) == labels[order]).mean())
