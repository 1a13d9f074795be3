"""Pure-Python twins of the compiled kernels in :mod:`guard._ext`."""
