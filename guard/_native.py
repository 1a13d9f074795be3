"""The one place that picks compiled kernels or their pure-Python twins.

At import, each kernel comes from :mod:`guard._ext` when it was built, and from
:mod:`guard._py` when it was not or when ``GUARD_NO_EXTENSIONS`` is set to a
non-empty value other than ``0``. Both produce bit-identical results; callers
import from here and never from either package directly.

``check_and_cast(x, out_dtype, lo, hi, allow_nonfinite) -> (out, index, code)``
    One pass over a tensor for the ``validate`` stage: every value finite
    (unless allowed), within ``[lo, hi]`` (either bound may be ``None``), cast
    to ``out_dtype``. See :mod:`guard._py.check` for the exact rules.
"""

from __future__ import annotations

import os

from guard._py.check import Violation

__all__ = ["USING_EXTENSIONS", "Violation", "check_and_cast"]

USING_EXTENSIONS: bool
if os.environ.get("GUARD_NO_EXTENSIONS", "") not in ("", "0"):
    from guard._py.check import check_and_cast

    USING_EXTENSIONS = False
else:
    try:
        from guard._ext.check import check_and_cast
    except ImportError:
        from guard._py.check import check_and_cast

        USING_EXTENSIONS = False
    else:
        USING_EXTENSIONS = True
