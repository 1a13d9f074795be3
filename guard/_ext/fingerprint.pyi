import numpy as np

def fingerprint(
    x: np.ndarray,
    offsets: np.ndarray,
    step: float,
    window: int,
    stride: int,
    top: int,
    multiplier: int,
    k1: int,
    k2: int,
) -> tuple[np.ndarray, np.ndarray]: ...
