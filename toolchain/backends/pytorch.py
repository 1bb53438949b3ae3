"""A PyTorch module as a runner: the reference outputs, and the unfused-model timing."""

from __future__ import annotations

import numpy as np

from .base import Runner


class TorchRunner(Runner):
    """A PyTorch module in eval mode on the CPU (the reference, and the unfused-model timing)."""

    backend = "torch"

    def __init__(self, model, name: str, graph: str):
        super().__init__(name, graph, "fp32")
        self._model = model

    def _activate(self) -> None:
        self._model.eval()

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._model(torch.from_numpy(x)).float().numpy()
