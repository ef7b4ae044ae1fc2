"""Pacing a migration's data to a bandwidth cap.

``Pacer`` is a virtual clock (the generic cell rate algorithm): every piece of ``n``
bytes is due at ``due`` and moves ``due`` on by ``n / rate`` seconds; a sender that is
early sleeps until its piece is due.  Pieces are small (``piece`` bytes: about 20 ms of
data, at most one stream packet), so the stream never carries more than a packet or
two ahead of the line ``rate * t``.  A sender that fell behind (a slow disk, a busy
loop) may catch up by at most ``SLACK`` seconds' worth: enough to absorb sleeps that
wake late, too little for a burst.  The average over any stretch of a second or more
is therefore ``rate`` to well within 1 %.  ``set_rate`` takes effect at once.
"""

from __future__ import annotations

import asyncio

from ..constants import STREAM_CHUNK

#: Seconds of lateness a sender may make up for (sleeps waking late add up otherwise).
SLACK = 0.02
#: Seconds of data in one piece at the cap (capped to a stream packet, floored at 4 KiB).
PIECE_TIME = 0.02
MIN_PIECE = 4096


class Pacer:
    def __init__(self, rate: int = 0) -> None:
        self.rate = rate
        self._due: float | None = None
        self._wake: asyncio.Future[None] | None = None

    def set_rate(self, rate: int) -> None:
        """A new cap in bytes/s (0: unlimited), at once (a sender asleep is woken)."""
        self.rate = rate
        self._due = None
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    @property
    def piece(self) -> int:
        """Bytes to hand to the stream at a time."""
        if not self.rate:
            return 1 << 62
        return max(MIN_PIECE, min(STREAM_CHUNK, int(self.rate * PIECE_TIME)))

    async def wait(self, n: int) -> None:
        """Until ``n`` more bytes may go."""
        rate = self.rate
        if not rate:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = self._due
        if due is None or due < now - SLACK:
            due = now if due is None else now - SLACK
        if due > now:
            wake = self._wake = loop.create_future()
            try:
                await asyncio.wait((wake,), timeout=due - now)
            finally:
                self._wake = None
                wake.cancel()
        if self.rate != rate:  # changed while asleep: start the new rate's clock
            return await self.wait(n)
        self._due = due + n / rate
