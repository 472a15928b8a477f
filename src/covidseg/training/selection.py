"""Best-epoch selection and early stopping on a validation score (higher is better)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BestEpoch:
    """The best score seen so far, its epoch, and how many epochs have passed without improving on it.

    ``score`` starts at -1 (below any Dice), ``epoch`` at 0 (none yet).
    """

    score: float = -1.0
    epoch: int = 0
    since: int = 0

    def update(self, epoch: int, score: float) -> bool:
        """Record ``epoch``'s score; True when it is a new best (strictly higher), which resets ``since``."""
        if score > self.score:
            self.score, self.epoch, self.since = score, epoch, 0
            return True
        self.since += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """Whether to stop: ``patience`` > 0 epochs in a row without a new best (``patience`` 0 never stops)."""
        return bool(patience) and self.since >= patience
