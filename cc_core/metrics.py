"""ACC, ASR, RA and per-class accuracy with batched inference (BackdoorBench conventions).

ASR: poisoned test inputs classified as the attack label; all-to-one leaves out samples whose
true class is the target. RA: poisoned inputs classified as their true label.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cc_core.data import ImageData, normalize
from cc_core.device import channels_last, resolve_device
from cc_core.errors import InputError
from cc_core.evalmode import eval_mode


@torch.inference_mode()
def predict(model: nn.Module, x_uint8: torch.Tensor, mean, std, batch_size: int = 500,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted labels (N,) for uint8 images (N, 3, H, W); ``transform`` acts on [0, 1] pixels
    before normalization (e.g. an attack's trigger)."""
    device = resolve_device(device)
    model.to(device)
    preds = []
    with eval_mode(model), channels_last(model):
        for start in range(0, len(x_uint8), batch_size):
            xb = x_uint8[start:start + batch_size].to(device).float().div_(255)
            if transform is not None:
                xb = transform(xb).clamp_(0, 1)
            xb = normalize(xb, mean, std)
            preds.append(model(xb).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def per_class_accuracy(preds: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    out = []
    for c in range(num_classes):
        mask = y == c
        out.append(float((preds[mask] == c).float().mean()) if mask.any() else None)
    return out


def evaluate(model: nn.Module, data: ImageData, attack=None, mean=None, std=None,
             batch_size: int = 500, device: str | torch.device | None = None) -> dict:
    """{"acc", "asr", "ra", "per_class_acc", "n_clean", "n_poison"}; asr/ra are None without an
    attack. ``mean``/``std`` default to the model's spec."""
    spec = getattr(model, "cc_spec", None)
    mean = mean if mean is not None else spec.mean
    std = std if std is not None else spec.std
    num_classes = spec.num_classes if spec is not None else data.num_classes
    if data.num_classes > num_classes or (len(data.y) and int(data.y.max()) >= num_classes):
        raise InputError(f"the evaluation data has labels up to {int(data.y.max())} but the model "
                         f"has {num_classes} classes: wrong --eval-data?")
    x, y = data.tensors()
    preds = predict(model, x, mean, std, batch_size, device=device)
    result = {"acc": float((preds == y).float().mean()),
              "per_class_acc": per_class_accuracy(preds, y, num_classes),
              "n_clean": len(y), "asr": None, "ra": None, "n_poison": 0}
    if attack is not None:
        if attack.num_classes != num_classes:
            raise InputError(f"the attack spec is for {attack.num_classes} classes but the model "
                             f"has {num_classes}")
        keep = attack.eligible(y)
        xp, yp = x[keep], y[keep]
        trig = predict(model, xp, mean, std, batch_size, transform=attack.apply_trigger, device=device)
        result.update(asr=float((trig == attack.attack_labels(yp)).float().mean()),
                      ra=float((trig == yp).float().mean()), n_poison=len(yp))
    return result
