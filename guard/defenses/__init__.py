"""Defence algorithms, independent of the serving path: arrays in, arrays out.

Stages in :mod:`guard.stages` wrap them for requests; offline commands use them
directly. Importing this package imports nothing heavy.
"""
