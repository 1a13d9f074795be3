import numpy as np

def release(
    scores: np.ndarray,
    edges: np.ndarray,
    levels: np.ndarray,
    shares: np.ndarray,
    ordered: int,
    lo: float,
    hi: float,
) -> tuple[np.ndarray, int]: ...
