from typing import Any

import numpy as np

from guard._py.check import Violation

def check_and_cast(
    x: np.ndarray,
    out_dtype: Any,
    lo: float | None,
    hi: float | None,
    allow_nonfinite: bool,
) -> tuple[np.ndarray, int, Violation]: ...
