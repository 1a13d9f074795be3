"""The one place that picks compiled kernels or their pure-Python twins.

At import, each kernel comes from :mod:`guard._ext` when it was built, and from
:mod:`guard._py` when it was not or when ``GUARD_NO_EXTENSIONS`` is set to a
non-empty value other than ``0``. Both produce bit-identical results; callers
import from here and never from either package directly.

``check_and_cast(x, out_dtype, lo, hi, allow_nonfinite) -> (out, index, code)``
    One pass over a tensor for the ``validate`` stage: every value finite
    (unless allowed), within ``[lo, hi]`` (either bound may be ``None``), cast
    to ``out_dtype``. See :mod:`guard._py.check` for the exact rules.

``reduce_bits(x, bits, lo, hi)``, ``median_smooth(x, size, height, width, channels, layout)``,
``clip(x, lo, hi)``
    The feature squeezers of the ``squeeze`` and ``squeeze_detect`` stages, each
    returning a new array of ``x``'s shape and dtype. See :mod:`guard._py.squeeze`.

``fingerprint(x, offsets, step, window, stride, top, multiplier, k1, k2) -> (hashes, sizes)``
    Blacklight's query fingerprints: the ``top`` largest keyed hashes of the
    quantized windows of each row. See :mod:`guard._py.fingerprint`.

``PostingIndex()``
    Blacklight's inverted index (hash -> ascending query ids) that the memory state store
    matches fingerprints with. See :mod:`guard._py.postings`.

``coverage_within(rows, count, x, limit) -> bool``
    The ``coverage`` stage's novelty test: whether one of the first ``count`` int16 rows
    lies within squared distance ``limit`` of ``x``, exactly. See :mod:`guard._py.coverage`.

``release_bins(scores, edges, levels, shares, ordered, lo, hi) -> (released, code)``
    The ``privacy`` stage's confidence bins: the batch of probability rows checked
    (``code`` non-zero: not probabilities) and released as each row's level and shares.
    See :mod:`guard._py.bins`.

``prada_scan(table, x) -> (d2, threshold)``
    One PRADA observation: the least squared L2 distance from ``x`` to the members of a
    stored growing set, and the set's threshold ``T_c``. See :mod:`guard._py.prada`.
``prada_nearest(members, x) -> d2``, ``prada_threshold(joined) -> T_c``
    The same two values apart, for a growing set held as its members' values and the
    distances they joined at (:class:`guard.defenses.prada.GrowingSet`).
``prada_nearest_pruned(members, norms, largest, x) -> d2``
    ``prada_nearest``'s value, the members compared in float32 first (their squared
    norms given) and only those that can be nearest computed exactly.

The kernels are taken together: if any of them is missing (a partial build),
every one comes from :mod:`guard._py`, so ``USING_EXTENSIONS`` tells the whole story.
"""

from __future__ import annotations

import os

from guard._py.check import Violation

__all__ = [
    "USING_EXTENSIONS",
    "PostingIndex",
    "Violation",
    "check_and_cast",
    "clip",
    "coverage_within",
    "fingerprint",
    "median_smooth",
    "prada_nearest",
    "prada_nearest_pruned",
    "prada_scan",
    "prada_threshold",
    "reduce_bits",
    "release_bins",
]

USING_EXTENSIONS: bool
if os.environ.get("GUARD_NO_EXTENSIONS", "") not in ("", "0"):
    from guard._py.bins import release as release_bins
    from guard._py.check import check_and_cast
    from guard._py.coverage import within as coverage_within
    from guard._py.fingerprint import fingerprint
    from guard._py.postings import PostingIndex
    from guard._py.prada import nearest as prada_nearest
    from guard._py.prada import nearest_pruned as prada_nearest_pruned
    from guard._py.prada import scan as prada_scan
    from guard._py.prada import threshold as prada_threshold
    from guard._py.squeeze import clip, median_smooth, reduce_bits

    USING_EXTENSIONS = False
else:
    try:
        from guard._ext.bins import release as release_bins
        from guard._ext.check import check_and_cast
        from guard._ext.coverage import within as coverage_within
        from guard._ext.fingerprint import fingerprint
        from guard._ext.postings import PostingIndex  # type: ignore[assignment]
        from guard._ext.prada import nearest as prada_nearest
        from guard._ext.prada import nearest_pruned as prada_nearest_pruned
        from guard._ext.prada import scan as prada_scan
        from guard._ext.prada import threshold as prada_threshold
        from guard._ext.squeeze import clip, median_smooth, reduce_bits
    except ImportError:
        from guard._py.bins import release as release_bins
        from guard._py.check import check_and_cast
        from guard._py.coverage import within as coverage_within
        from guard._py.fingerprint import fingerprint
        from guard._py.postings import PostingIndex
        from guard._py.prada import nearest as prada_nearest
        from guard._py.prada import nearest_pruned as prada_nearest_pruned
        from guard._py.prada import scan as prada_scan
        from guard._py.prada import threshold as prada_threshold
        from guard._py.squeeze import clip, median_smooth, reduce_bits

        USING_EXTENSIONS = False
    else:
        USING_EXTENSIONS = True
