"""A continuously refilling bucket with a small capacity that may go into debt, so requests are
paced evenly and one larger than the capacity still passes (when the bucket is full)."""

from __future__ import annotations


class Bucket:
    """One per-minute limit, refilled at `pace` × the limit. `flow` is the cumulative refill minus
    spend (never clipped): the yardstick for comparing a server's `remaining` with our spending since."""

    __slots__ = ("burst_s", "capacity", "flow", "level", "owed", "owed_stamp", "per_minute", "rate", "stamp")

    def __init__(self, per_minute: float, *, burst_s: float, pace: float, now: float) -> None:
        self.stamp = now
        self.flow = 0.0
        self.level = 0.0
        self.owed = 0.0  # burst the server has room for that this bucket has not had (see `grow`)
        self.owed_stamp = now
        self.configure(per_minute, burst_s=burst_s, pace=pace, now=now)
        self.level = self.capacity  # start full, as the providers' buckets do

    def configure(self, per_minute: float, *, burst_s: float, pace: float, now: float) -> None:
        """Change the limit or the pace; what was refilled so far is kept."""
        self.refill(now)
        self.per_minute = per_minute
        self.burst_s = burst_s
        self.rate = max(per_minute * pace / 60.0, 1e-9)
        # At least one unit, so a limit under 60/burst_s per minute still admits one at a time.
        self.capacity = max(per_minute * burst_s / 60.0, 1.0)
        self.level = min(self.level, self.capacity)

    def refill(self, now: float) -> None:
        dt = now - self.stamp
        if dt > 0:
            add = dt * self.rate
            self.flow += add
            self.level = min(self.capacity, self.level + add)
            self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until `cost` fits (0 when it fits now); call after refill. A cost above the
        capacity fits when the bucket is full, then leaves it in debt."""
        need = min(self.capacity, cost)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def charge(self, cost: float) -> None:
        self.level -= cost
        self.flow -= cost

    def adjust(self, amount: float) -> None:
        """Hand back (amount > 0) or charge more (amount < 0) after the fact; call after refill."""
        self.flow += amount
        self.level = min(self.capacity, self.level + amount)

    def grow(self, burst_s: float, *, pace: float, now: float) -> None:
        """Take a bigger capacity learned from the server. The level does not jump by the difference
        (sent at once, it would meet the server bunched behind new connections); it is owed instead,
        and `follow_server` hands it over at a slow pace while the server confirms the room."""
        before = self.capacity
        self.configure(self.per_minute, burst_s=burst_s, pace=pace, now=now)
        self.owed = max(0.0, self.owed + self.capacity - before)
        self.owed_stamp = now

    def follow_server(self, remaining: float, mark: float, *, margin: float, lift_share: float, now: float) -> None:
        """The server said `remaining` on the answer to a request charged at `mark`; keep `margin` of
        it in hand, for requests that reach it bunched.

        Servers may count a request when they admit it (then our net refill since, `flow - mark`,
        comes on top) or when they answer (then everything sent before the answer is already in
        it, and subtracting our spending since `mark` again would halve a burst). Take the later
        reading when we spent more than we refilled.

        Our level drops at once to what the server has room for; it rises above our own
        accounting only to pay what is `owed`, at most `lift_share` × the rate."""
        room = remaining + max(0.0, self.flow - mark) - margin
        if room < self.level:
            self.level = room
        elif self.owed > 0.0:
            step = min(self.owed, lift_share * self.rate * (now - self.owed_stamp), room - self.level)
            self.owed_stamp = now
            if step > 0.0:
                self.owed -= step
                self.level = min(self.capacity, self.level + step)

    def drain(self) -> None:
        """The server says it is empty: resume from empty rather than with a burst, and owe nothing."""
        self.owed = 0.0
        if self.level > 0:
            self.level = 0.0
