"""Query provenance: link each query to the client's most similar earlier query.

After QPA (Li et al., "Query Provenance Analysis for Robust and Efficient
Query-based Black-box Attack Defense", IEEE S&P 2024): an attack's queries
descend from one another (each is a small step, or a random transform, away
from an earlier one), while a client's honest queries are mostly unrelated
inputs. Hash fingerprints (Blacklight) break under fresh random transforms
(OARS, Feng et al., CCS 2023); distances in input space do not break unless the
transform moves the query farther than the link distance, and then the attack's
own progress suffers.

Per client the guard keeps its recent rows (oldest first), each with the id of
its *chain*. A new row is

* a *repeat* when an earlier row is identical (distance 0): no evidence, and not
  stored again;
* *linked* when its nearest earlier row lies within ``distance`` (L2, input
  units): it joins that row's chain;
* otherwise the first row of a new chain.

The decision is on the chains, not on single links: a client is flagged when
one of its chains holds ``links`` rows. An honest client's chains stay short
(a jittered retry, a few re-encodings of one input); an attack walking around
one input grows one chain with nearly every query.

Cost per row: one pass over at most ``history`` rows (64 values each for the
digits model: about 10 µs with numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Link", "link_rows"]


@dataclass(frozen=True, slots=True)
class Link:
    """How one row relates to the earlier rows."""

    nearest: float  # L2 distance to the nearest earlier row (inf when there is none)
    parent: int  # index of that row among the earlier rows (history, then batch); -1: none
    repeat: bool  # identical to an earlier row
    linked: bool  # within the link distance (and not a repeat)


def link_rows(history: np.ndarray, rows: np.ndarray, distance: float) -> list[Link]:
    """Link each row of ``rows`` (``[N, D]``) to ``history`` (``[H, D]``) and to the rows
    of the batch before it (index ``H + i`` for batch row ``i``)."""
    rows = np.asarray(rows, dtype=np.float32)
    known = np.asarray(history, dtype=np.float32).reshape(-1, rows.shape[1])
    links = []
    for i, row in enumerate(rows):
        earlier = known if i == 0 else np.concatenate([known, rows[:i]])
        if len(earlier) == 0:
            links.append(Link(float("inf"), -1, False, False))
            continue
        diff = earlier - row
        d2 = np.einsum("ij,ij->i", diff, diff)
        parent = int(np.argmin(d2))
        nearest = float(np.sqrt(d2[parent]))
        repeat = nearest == 0.0
        links.append(Link(nearest, parent, repeat, not repeat and nearest <= distance))
    return links
