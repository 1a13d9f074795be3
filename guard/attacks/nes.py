"""Natural Evolution Strategies gradient estimates from scores alone.

Ilyas, Engstrom, Athalye, Lin. "Black-box Adversarial Attacks with Limited
Queries and Information." ICML 2018. With antithetic sampling,

    grad f(x) ~ 1 / (2 n sigma) * sum_i (f(x + sigma u_i) - f(x - sigma u_i)) u_i,
    u_i ~ N(0, I),

which costs ``2 n`` queries. Pairs with a refused query are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Objective = Callable[[np.ndarray], np.ndarray]  # rows -> values (NaN: refused)


def nes_gradient(
    f: Objective,
    x: np.ndarray,
    *,
    pairs: int,
    sigma: float,
    rng: np.random.Generator,
    lo: np.ndarray | float = -np.inf,
    hi: np.ndarray | float = np.inf,
) -> np.ndarray:
    """The NES estimate of ``grad f`` at ``x`` from ``pairs`` antithetic pairs.

    Probes are clipped to ``[lo, hi]`` (the estimate then measures the clipped
    function, as the target sees it). All zeros when every pair was refused.
    """
    u = rng.standard_normal((pairs, x.size))
    probes = np.clip(np.concatenate([x + sigma * u, x - sigma * u]), lo, hi)
    values = f(probes)
    diff = values[:pairs] - values[pairs:]
    kept = ~np.isnan(diff)
    if not kept.any():
        return np.zeros_like(x)
    return (diff[kept, None] * u[kept]).sum(axis=0) / (2 * kept.sum() * sigma)
