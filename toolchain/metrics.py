"""Scoring predictions: macro-F1, accuracy and batched inference of a PyTorch model (no training here,
so fusion and verification can score without importing the training loop)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data.formats import Split


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over the labels present in y_true or y_pred (scikit-learn's default)."""
    labels = np.union1d(y_true, y_pred)
    scores = []
    for c in labels:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        scores.append(0.0 if denom == 0 else 2 * tp / denom)
    return float(np.mean(scores)) if scores else 0.0


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (the CPU for a model without any)."""
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of `model` in fp32 on the device it lives on, batch by batch."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = [model(torch.from_numpy(X[i : i + batch_size]).to(device)).float().cpu().numpy()
           for i in range(0, len(X), batch_size)]
    model.train(was_training)
    return np.concatenate(out)


def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """(macro-F1, accuracy) of `model` on `split`."""
    pred = predict_logits(model, split.X).argmax(axis=1)
    return macro_f1(split.y, pred), float(np.mean(pred == split.y))
