"""A small differentiable classifier in numpy: what extraction attacks train.

One hidden ReLU layer and a softmax, trained with Adam on soft targets
(cross-entropy against victim probabilities, or one-hot labels). Inputs are
standardised with the statistics of the first ``fit`` data. Its input
Jacobian is exact (:meth:`Surrogate.class_gradients`), which JbDA needs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class Surrogate:
    """``x -> softmax(W2 relu(W1 z + b1) + b2)`` with ``z`` the standardised input."""

    def __init__(self, n_features: int, n_classes: int, *, hidden: int = 128) -> None:
        self.n_features = n_features
        self.n_classes = n_classes
        self.hidden = hidden
        self.mean = np.zeros(n_features)
        self.std = np.ones(n_features)
        self.params: list[np.ndarray] = []

    def fit(
        self,
        x: np.ndarray,
        targets: np.ndarray,
        *,
        rng: np.random.Generator,
        steps: int = 1500,
        batch_size: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
    ) -> Surrogate:
        """Train from scratch on ``x`` ``[N, F]`` and target distributions ``[N, C]``
        for ``steps`` minibatch updates (independent of ``N``, so small sets are not
        under-trained and large ones cost no more)."""
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        self.std = np.where(std > 1e-9, std, 1.0)  # a constant feature is left unscaled
        z = (x - self.mean) / self.std
        f, h, c = self.n_features, self.hidden, self.n_classes
        self.params = [
            rng.normal(0.0, np.sqrt(2.0 / f), (f, h)),
            np.zeros(h),
            rng.normal(0.0, np.sqrt(1.0 / h), (h, c)),
            np.zeros(c),
        ]
        moments = [np.zeros_like(p) for p in self.params]
        squares = [np.zeros_like(p) for p in self.params]
        batches = _batches(len(z), batch_size, rng)
        for step in range(1, steps + 1):
            rows = next(batches)
            grads = self._gradients(z[rows], targets[rows])
            for p, g, m, v in zip(self.params, grads, moments, squares, strict=True):
                g = g + weight_decay * p
                m *= 0.9
                m += 0.1 * g
                v *= 0.999
                v += 0.001 * g * g
                p -= lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self._logits((np.asarray(x, dtype=np.float64) - self.mean) / self.std)[1])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(axis=1)

    def class_gradients(self, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``d logit_{classes[i]} / d x_i`` per row, in input units ``[N, F]``."""
        w1, b1, w2, _ = self.params
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        active = (z @ w1 + b1) > 0
        return ((active * w2[:, classes].T) @ w1.T) / self.std

    def _logits(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w1, b1, w2, b2 = self.params
        hidden = np.maximum(z @ w1 + b1, 0.0)
        return hidden, hidden @ w2 + b2

    def _gradients(self, z: np.ndarray, targets: np.ndarray) -> list[np.ndarray]:
        w2 = self.params[2]
        hidden, logits = self._logits(z)
        d_logits = (_softmax(logits) - targets) / len(z)
        d_hidden = (d_logits @ w2.T) * (hidden > 0)
        return [z.T @ d_hidden, d_hidden.sum(axis=0), hidden.T @ d_logits, d_logits.sum(axis=0)]


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Minibatch indices, epoch after epoch, each epoch a fresh permutation."""
    while True:
        order = rng.permutation(n)
        for begin in range(0, n, size):
            yield order[begin : begin + size]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
