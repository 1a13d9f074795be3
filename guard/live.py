"""What a running guard holds across requests and reloads (``app[LIVE]``).

Its own module so that :mod:`guard.appkeys` can name its type without
importing the server.
"""

from __future__ import annotations

import asyncio

from guard.admission import ClientSlots, DecodeMeter
from guard.config import OFFLOAD_DECODE_BYTES
from guard.errors import Overloaded
from guard.offload import Decoder
from guard.runtime import Runtime
from guard.state import StateStore

__all__ = ["Live"]


class Live:
    """The runtime being served, swapped whole on reload."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self.reload_lock = asyncio.Lock()
        self.in_flight = 0
        self.retiring: set[asyncio.Task[None]] = set()
        # The state store stages use: one per app, kept across reloads while the policy's
        # state section is unchanged. ``stores`` holds it and any a retiring runtime still uses.
        self.state: StateStore | None = None
        self.stores: set[StateStore] = set()
        # Per process, whatever the state store: what one client may take of this process.
        self.slots = ClientSlots()
        self.meter = DecodeMeter()
        self.decoder = Decoder(OFFLOAD_DECODE_BYTES)

    def current(self) -> Runtime:
        if self.runtime is None:
            raise Overloaded("the guard is starting; no policy is loaded yet")
        return self.runtime
