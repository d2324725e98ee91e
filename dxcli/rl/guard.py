"""The collapse guard's decision (METHOD.md §12): is the policy still answering like a detector?

RL can drift into a degenerate policy that no reward notices: every verdict one class (test-time
RL with majority labels reinforces whichever class already leads) or answers that stop reaching
`### Answer:` at all. The guard compares greedy answers on a fixed probe set of the run's own
prompts (no labels needed) with the starting model's answers on the same set. Pure functions:
the probing itself is `dxcli.training.guard`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeMix:
    """Greedy verdicts on the probe set, counted over every rank."""

    real: int
    fake: int
    invalid: int

    @property
    def total(self) -> int:
        return self.real + self.fake + self.invalid

    @property
    def valid(self) -> int:
        return self.real + self.fake

    @property
    def invalid_rate(self) -> float:
        return self.invalid / self.total if self.total else 0.0

    @property
    def minority_share(self) -> float:
        """The smaller class's share of the valid answers (0 with none valid)."""
        return min(self.real, self.fake) / self.valid if self.valid else 0.0

    @property
    def leading(self) -> str:
        return "real" if self.real >= self.fake else "fake"

    def describe(self) -> str:
        return f"{self.real} real / {self.fake} fake / {self.invalid} invalid"

    def to_json(self) -> dict[str, int]:
        return {"real": self.real, "fake": self.fake, "invalid": self.invalid}


def judges_classes(start: ProbeMix, min_class_share: float) -> bool:
    """Whether the class mix can be guarded: the starting model called both classes, each on at
    least `min_class_share` of its valid probe answers (a model that already calls one class has
    no mix left to lose; the guard then watches the invalid rate only)."""
    return start.valid > 0 and start.minority_share >= min_class_share


def drift(start: ProbeMix, now: ProbeMix, *, min_class_share: float, max_invalid_rise: float) -> str | None:
    """What went wrong between the start and now, in a phrase; None while the policy is healthy.

    Collapsed: the invalid rate rose by more than `max_invalid_rise` (absolute), or - when the
    start called both classes - the smaller class fell below `min_class_share` of the valid answers
    (one class swallowed the other; every answer invalid counts as that too)."""
    if now.invalid_rate > start.invalid_rate + max_invalid_rise:
        return (f"invalid answers rose from {start.invalid_rate:.0%} to {now.invalid_rate:.0%} of the probe "
                f"(more than prpo.guard_max_invalid_rise={max_invalid_rise})")
    if judges_classes(start, min_class_share) and now.minority_share < min_class_share:
        return (f"verdicts drifted to '{now.leading}': {now.describe()} on the probe, against "
                f"{start.describe()} at the start (the smaller class under prpo.guard_min_class_share="
                f"{min_class_share})")
    return None
