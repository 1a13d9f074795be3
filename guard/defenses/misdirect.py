"""Misdirection: what a detected client is answered instead of the truth.

A client a detector has marked keeps getting answers (status 200, the usual
headers and timing), but each of its query rows is answered with the model's
answer for an *anchor*: the earliest of the client's recent rows within
``radius`` (L2, input units) of it, or the row itself when none is. For an
attack that walks around one starting input, every query then gets the answer
of that starting input (or of the first query the walk made in that region):

* a decision-based attack (HopSkipJump, boundary walks) sees the label never
  change, so it finds no boundary, and a search that started from an
  adversarial point (an earlier random image) finds "adversarial" everywhere
  near it, so what it returns fails on the real model;
* a score-based attack (Square, SimBA, NES) sees scores that do not move with
  its perturbations (only the per-input privacy noise, if any), so it learns
  no gradient and accepts no real improvement.

Answers stay consistent per input while the client's history holds its anchors:
the same row always maps to the same anchor, and an exact repeat of a query sent
before the mark gets its earlier answer back when that query is its own anchor.
"""

from __future__ import annotations

import numpy as np

__all__ = ["anchor_rows"]


def anchor_rows(history: np.ndarray, rows: np.ndarray, radius: float | None) -> np.ndarray:
    """Per row of ``rows`` (``[N, D]``), the earliest row of ``history`` (``[H, D]``, oldest
    first) within L2 distance ``radius`` (``None``: any distance), else the row itself."""
    rows = np.asarray(rows, dtype=np.float32)
    if len(history) == 0:
        return rows.copy()
    history = np.asarray(history, dtype=np.float32)
    if radius is None:
        return np.repeat(history[:1], len(rows), axis=0)
    # Squared distances without forming [N, H, D]: |a|^2 + |b|^2 - 2 a.b
    d2 = (
        np.einsum("ij,ij->i", rows, rows)[:, None]
        + np.einsum("ij,ij->i", history, history)[None, :]
        - 2.0 * rows @ history.T
    )
    near = d2 <= radius * radius
    first = np.argmax(near, axis=1)
    found = near[np.arange(len(rows)), first]
    return np.where(found[:, None], history[first], rows)
