"""The offline attack suite: measure a model or a guard against attacks you run yourself.

Never imported by the serving path. Families, one module each:

* :mod:`~guard.attacks.targets`: what is attacked (a local ONNX model or a V2
  endpoint such as a guard), counting queries and recording verdicts;
* :mod:`~guard.attacks.evasion`: HopSkipJump, Square (L-inf, L2), SimBA;
* :mod:`~guard.attacks.extraction`: Knockoff-style and JbDA model stealing;
* :mod:`~guard.attacks.membership`: loss/confidence thresholds, shadow models,
  label-only membership inference;
* :mod:`~guard.attacks.inversion`: black-box model inversion by NES;
* :mod:`~guard.attacks.benign`: ordinary clients, to measure false positives;
* :mod:`~guard.attacks.report`: JSON reports, a terminal table, optional plots;
* :mod:`~guard.attacks.registry`: every named attack, read by attack, tune and demo;
* :mod:`~guard.attacks.suite`: the named attacks behind ``guard attack``.

Randomness comes only from the ``numpy.random.Generator`` each attack is given.
"""
