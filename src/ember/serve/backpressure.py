"""A bound on the requests waiting for a slot: past it, new generation requests are refused at once
with a 429 and `Retry-After` (OpenAI's rate-limit answer, which its clients retry after the delay)
instead of joining an unbounded queue."""
from __future__ import annotations

from .protocol import ApiError

RETRY_AFTER_S = 1  # the delay Retry-After asks for (a slot frees as soon as any request ends)


class Overloaded(ApiError):
    """429 with a Retry-After header."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(429, message, type="requests", code="rate_limit_exceeded")
        self.headers = {"retry-after": str(retry_after)}


def check_queue(scheduler, n: int, max_waiting: int | None) -> None:
    """Refuse `n` more requests if they would leave more than `max_waiting` requests waiting for a
    slot (None: no bound). Those that find a free slot at once do not wait."""
    if max_waiting is None:
        return
    free = max(0, scheduler.max_batch - scheduler.running)
    waiting = scheduler.waiting
    if max(0, waiting + n - free) > max_waiting:
        raise Overloaded(f"The server is busy: {waiting} requests are waiting for one of its {scheduler.max_batch} "
                         f"slots (at most {max_waiting} may wait; --max-waiting). Retry after "
                         f"{RETRY_AFTER_S} second(s).")
