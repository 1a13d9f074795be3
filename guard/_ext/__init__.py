"""Compiled kernels built from ``ext/*.pyx``; import them through :mod:`guard._native`."""
