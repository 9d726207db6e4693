"""Backoff: when to look again at a choice that keeps being confirmed.

Three parts of the engine re-measure what they chose not to do: the speed guard runs a plain step
now and then while speculation wins (and the other way round), the goodput policy verifies a whole
tree now and then for positions it stopped verifying, and `auto` lets a losing candidate draft now and
then to score it. Each looks again after an interval that doubles while what it sees confirms the
choice, and starts short again when the choice is overturned.
"""
from __future__ import annotations


class Backoff:
    """A check due at step `next`; after it, the next one `interval` steps on, the interval doubling
    (up to `longest`) when the check confirmed the choice and back to `shortest` when it did not.
    The caller counts the steps."""

    def __init__(self, shortest: int, longest: int) -> None:
        self.shortest, self.longest = shortest, longest
        self.interval = shortest
        self.next = shortest

    def due(self, step: int) -> bool:
        return step >= self.next

    def checked(self, step: int, confirmed: bool = True) -> None:
        """The check due was made at `step`."""
        self.interval = min(2 * self.interval, self.longest) if confirmed else self.shortest
        self.next = step + self.interval

    def postpone(self, step: int) -> None:
        """A check due at `step` could not be made then: it is due at the next step."""
        if self.due(step):
            self.next = step + 1

    def recheck_at(self, step: int) -> None:
        """Look again at `step`, leaving the interval as it is."""
        self.next = step
