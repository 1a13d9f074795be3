"""Monte Carlo votes of a classifier under Gaussian noise: counts of f(x + ε), ε ~ N(0, σ²I).

Memory does not grow with the number of samples: noise is drawn into one
preallocated buffer of ``batch`` rows that every chunk reuses, and votes are
accumulated with :func:`numpy.bincount`, so the ``num`` noisy copies never exist
at once (a sample costs ``batch`` rows of memory whether ``num`` is 10² or 10⁶).
The classifier is injected: a synchronous ``predict_labels(x_batch) -> labels``
(an in-process model) or an awaitable one (a model server reached over HTTP).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np

from guard.inference import class_output

LabelFn = Callable[[np.ndarray], np.ndarray]
AsyncLabelFn = Callable[[np.ndarray], Awaitable[np.ndarray]]

# numpy.random.Generator.standard_normal fills only these in place.
NOISE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class NoiseSampler:
    """Draws noisy copies of one input in chunks and counts the labels they get.

    Guarantees: the chunks of one call together hold exactly ``num`` independent
    draws of ``x + σ·z``, z standard normal from the injected generator, in that
    generator's order (a float64 sampler reproduces
    ``x + σ·rng.standard_normal((num, *x.shape))`` bit for bit); peak memory is
    one buffer of ``min(batch, num)`` rows.
    """

    def __init__(self, sigma: float, *, batch: int = 1000, dtype: Any = np.float32) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0; got {sigma!r}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1; got {batch!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in NOISE_DTYPES:
            raise ValueError(f"noise dtype must be float32 or float64; got {self.dtype}")
        self.sigma = float(sigma)
        self.batch = int(batch)

    def chunks(self, x: np.ndarray, num: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield ``num`` noisy copies of ``x`` as chunks of at most ``batch`` rows.

        Every chunk is a view of the same buffer, overwritten by the next one:
        use it before asking for the next chunk.
        """
        if num < 0:
            raise ValueError(f"number of samples must be >= 0; got {num}")
        center = np.asarray(x, dtype=self.dtype)
        buffer = np.empty((min(self.batch, num), *center.shape), dtype=self.dtype)
        done = 0
        while done < num:
            chunk = buffer[: min(self.batch, num - done)]
            rng.standard_normal(out=chunk, dtype=self.dtype)
            chunk *= self.sigma
            chunk += center
            yield chunk
            done += len(chunk)

    def counts(
        self, x: np.ndarray, num: int, rng: np.random.Generator, predict_labels: LabelFn
    ) -> np.ndarray:
        """Votes per class (int64, index = label) of ``predict_labels`` on ``num`` noisy copies."""
        votes = np.zeros(0, dtype=np.int64)
        for chunk in self.chunks(x, num, rng):
            votes = add_votes(votes, predict_labels(chunk), len(chunk))
        return votes

    async def counts_async(
        self, x: np.ndarray, num: int, rng: np.random.Generator, predict_labels: AsyncLabelFn
    ) -> np.ndarray:
        """:meth:`counts` with an awaitable classifier; one chunk in flight at a time."""
        votes = np.zeros(0, dtype=np.int64)
        for chunk in self.chunks(x, num, rng):
            votes = add_votes(votes, await predict_labels(chunk), len(chunk))
        return votes


def add_votes(votes: np.ndarray, labels: np.ndarray, expected: int) -> np.ndarray:
    """``votes`` plus one vote per label, grown when a label is past its end.

    Raises ValueError unless ``labels`` holds exactly ``expected`` non-negative
    integers (:func:`numpy.bincount` refuses negative ones).
    """
    labels = np.asarray(labels)
    if labels.shape != (expected,) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"the classifier must return {expected} integer labels; "
            f"got shape {list(labels.shape)} of {labels.dtype}"
        )
    new = np.bincount(labels.astype(np.intp, copy=False), minlength=len(votes))
    new[: len(votes)] += votes
    return new


def labels_from_output(output: np.ndarray, rows: int) -> np.ndarray:
    """Class labels from a model output: an integer label output as is, scores by argmax.

    A label output is ``[rows]`` or ``[rows, 1]`` integers; a score output is
    ``[rows, classes]`` floats. Anything else raises ValueError.
    """
    output = np.asarray(output)
    kind = class_output(output.dtype.kind, output.shape)
    if kind is not None and output.shape[0] == rows:
        return output.reshape(rows) if kind == "labels" else output.argmax(axis=1)
    raise ValueError(
        f"expected {rows} integer labels or a [{rows}, classes] score array; "
        f"got shape {list(output.shape)} of {output.dtype}"
    )
