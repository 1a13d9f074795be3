"""Policies tuned from measured attacks: the machinery behind ``guard tune``.

A candidate policy is served by a real guard on loopback (:mod:`.measure`),
benign clients and the offline attack suite (:mod:`guard.attacks`) run against
it as distinct API clients, and what they got is measured: false positives,
accuracy lost, time spent in the stages, detections and what each attacker
still achieved. :mod:`.space` declares what may change per stage type,
:mod:`.search` walks that space (seeded coordinate descent) and picks the
candidate that meets the operator's constraints, :mod:`.policyfile` writes it
back as YAML with a comment on every tuned number, and :mod:`.report` renders
the trade-off.

Modules, smallest first: :mod:`.workload` (data splits and how much traffic a
budget sends), :mod:`.attackers` (one attack, one outcome; shared with
``guard demo``), :mod:`.measure`, :mod:`.space`, :mod:`.search`,
:mod:`.policyfile`, :mod:`.report`. Never imported by the serving path.
"""
