"""Failed-login backoff for the AMI gate: per source address and per username, in a sliding window.

After ``threshold`` failures within ``window`` seconds for a key, every further login that involves
the key is refused *without checking its secret* (so that guesses made meanwhile are worthless), and
answered after ``base * 2**k`` seconds (k = failures beyond the threshold, starting at 1), at most
``cap``. Those refusals count as failures too, so a client that keeps guessing stays throttled; the
window slides, so it ends ``window`` seconds after the last failure. A successful login clears its
username's count (not its address's: on a shared loopback address that would reopen the door).

Pure: the caller passes the monotonic time. Bounded: at most ``max_keys`` keys (the oldest are
forgotten first) and ``threshold + 64`` timestamps per key.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

__all__ = ["LoginThrottle", "throttle_keys"]

_MAX_NAME = 64


def throttle_keys(address: str | None, username: str) -> tuple[str, ...]:
    """The keys a login attempt counts under. Usernames are case-insensitive, as in Asterisk."""
    keys = [f"user:{username.strip().lower()[:_MAX_NAME]}"]
    if address:
        keys.append(f"addr:{address}")
    return tuple(keys)


class LoginThrottle:
    def __init__(
        self,
        threshold: int = 5,
        window: float = 60.0,
        base: float = 1.0,
        cap: float = 30.0,
        max_keys: int = 4096,
    ) -> None:
        self.threshold = max(1, threshold)
        self.window = window
        self.base = base
        self.cap = cap
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def _recent(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def delay(self, keys: Iterable[str], now: float) -> float | None:
        """None when the attempt may be checked; else how long to wait before refusing it unchecked."""
        worst = 0
        for key in keys:
            worst = max(worst, self._recent(key, now))
        if worst < self.threshold:
            return None
        beyond = min(worst - self.threshold + 1, 64)
        return float(min(self.cap, self.base * 2**beyond))

    def failure(self, keys: Iterable[str], now: float) -> None:
        for key in keys:
            times = self._failures.get(key)
            if times is None:
                times = self._failures[key] = deque(maxlen=self.threshold + 64)
            times.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def success(self, username: str) -> None:
        self._failures.pop(throttle_keys(None, username)[0], None)
