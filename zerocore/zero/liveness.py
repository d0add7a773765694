"""Which ranks are alive: a heartbeat per rank in the rendezvous store, read while a collective waits.

[Note: liveness]
A gloo collective whose peer died fails only if the peer was part of it: with more than two ranks a survivor
blocked in a collective among other survivors (ranks 0, 2 and 3 in one rank's broadcast, say, after rank 1 was
killed) waits until comm_timeout_s (30 minutes by default), and asking the ranks to check in names everyone
that is blocked, not only the dead one. So every engine runs a small thread that increments this rank's
counter under `zerocore/<engine uid>/alive/<rank>` in the group's store every HEARTBEAT_S, and a collective
waits in slices of WAIT_SLICE_S: between slices it reads every rank's counter, and a counter that has not moved
for DEAD_AFTER_S (on the reader's own clock: machines' clocks need not agree) means that rank is gone. The
wait then raises PeerFailure naming exactly the ranks whose counters stopped, within about DEAD_AFTER_S of the
death whatever collective each survivor is in; the first rank to find a dead rank publishes it in the store, so
the others, whatever collective they are in, name the same ranks within a slice. A rank that is merely slow (computing, or blocked in another
collective) keeps its counter moving, so it is never named; the thread needs the GIL only briefly, and the
store calls release it. A store that cannot be reached means its host (rank 0, or torchrun's agent) is gone.
The thread is stopped (and joined) when the engine closes, before interpreter shutdown ([Note: exit] in
collectives.py).
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Dict, List, Optional, Tuple

# Every rank's counter moves this often; a counter still for DEAD_AFTER_S is a dead rank. Generous against a
# loaded machine (a 2-core CI box under compilation), far below any collective timeout.
HEARTBEAT_S = 1.0
DEAD_AFTER_S = 10.0
# A collective waits in slices this long, reading the counters between them.
WAIT_SLICE_S = 2.0


# Every heartbeat still beating; stopped at exit, before interpreter finalization (a thread that needs the GIL
# then is unwound inside C++ and aborts the process: [Note: exit] in collectives.py).
_BEATING: "weakref.WeakSet[Liveness]" = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for live in list(_BEATING):
        live.stop()


atexit.register(_stop_all_at_exit)


class StoreGone(RuntimeError):
    """The rendezvous store cannot be reached: the rank (or agent) that hosts it is gone."""


class Liveness:
    """This rank's heartbeat and its view of every rank's (see [Note: liveness])."""

    def __init__(self, store, uid: str, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.prefix = f"zerocore/{uid}/alive/"
        self.seen: Dict[int, Tuple[int, float]] = {}    # rank -> (counter, local time it last moved)
        self._stop = threading.Event()
        self.store.add(self.prefix + str(rank), 1)      # one beat before anyone waits on it
        self._thread = threading.Thread(target=self._beat, name="zerocore-heartbeat", daemon=True)
        self._thread.start()
        _BEATING.add(self)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.add(self.prefix + str(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone: the waiters say so; nothing to beat into
                return

    def stop(self) -> None:
        """Stop beating and wait for the thread (a store call in flight returns at once or fails fast: its
        host closing the connection is an error, not a wait)."""
        self._stop.set()
        _BEATING.discard(self)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * HEARTBEAT_S)

    def counters(self) -> List[Optional[int]]:
        """Every rank's counter now (None: it never beat). Raises StoreGone."""
        keys = [self.prefix + str(r) for r in range(self.world_size)]
        try:
            present = [self.store.check([k]) for k in keys]
            return [int(self.store.get(k)) if ok else None for k, ok in zip(keys, present)]
        except (RuntimeError, OSError, ValueError) as e:  # DistStoreError is a RuntimeError
            raise StoreGone(str(e)) from None

    def dead(self, after_s: float = DEAD_AFTER_S) -> List[int]:
        """Ranks whose counter has not moved for `after_s` seconds of observation (a rank that never beat
        counts from the first observation). Raises StoreGone."""
        now = time.monotonic()
        out = []
        for r, value in enumerate(self.counters()):
            last = self.seen.get(r)
            if last is None or last[0] != value:
                self.seen[r] = (value, now)
            elif r != self.rank and now - last[1] >= after_s:
                out.append(r)
        return out

    def publish_dead(self, ranks: List[int]) -> None:
        """Tell every rank which ranks this one found dead (the first verdict stays)."""
        try:
            if not self.store.check([self.prefix + "dead"]):
                self.store.set(self.prefix + "dead", ",".join(map(str, ranks)))
        except (RuntimeError, OSError):
            pass

    def published_dead(self) -> Optional[List[int]]:
        """The dead ranks another rank found, if one did. Raises StoreGone."""
        try:
            if not self.store.check([self.prefix + "dead"]):
                return None
            return [int(r) for r in self.store.get(self.prefix + "dead").decode().split(",") if r]
        except (RuntimeError, OSError, ValueError) as e:
            raise StoreGone(str(e)) from None

    def quiet(self, within_s: float) -> List[int]:
        """Ranks whose counter does not move within `within_s` seconds from now (polled): after a connection
        error, the ranks that are gone. Raises StoreGone."""
        start = self.counters()
        deadline = time.monotonic() + within_s
        while True:
            time.sleep(min(0.25, HEARTBEAT_S / 2))
            now = self.counters()
            still = [r for r, (a, b) in enumerate(zip(start, now)) if a == b and r != self.rank]
            if not still or time.monotonic() >= deadline:
                return still
