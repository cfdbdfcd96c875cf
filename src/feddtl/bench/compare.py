"""Side-by-side verdicts for a bench report: FedDTL against every other method, and the paper's claims.

A verdict compares two cells of one scenario on one metric over their seeds. The difference of the
means is a *tie* when it is within one sample standard deviation of either cell (the larger of the
two), otherwise a *win* or a *loss* for the first method. With one seed both deviations are 0, so
any difference counts: run 3 seeds before reading the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REFERENCE = "feddtl"
"""The method every other one is compared against."""


@dataclass(frozen=True)
class Verdict:
    delta: float
    """Mean of the first cell minus mean of the second (points of accuracy); nan if either is empty."""
    margin: float
    """The tie threshold: the larger sample std of the two cells."""

    @property
    def outcome(self) -> str:
        if self.delta != self.delta:
            return "n/a"
        if abs(self.delta) <= self.margin:
            return "tie"
        return "win" if self.delta > 0 else "loss"


def verdict(first: list[float], second: list[float]) -> Verdict:
    """Compare two cells' per-seed values (first minus second)."""
    if not first or not second:
        return Verdict(math.nan, math.nan)
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    std = [float(x.std(ddof=1)) if len(x) > 1 else 0.0 for x in (a, b)]
    return Verdict(float(a.mean() - b.mean()), max(std))


@dataclass(frozen=True)
class Claim:
    """One direction the paper reports, as a comparison of two methods on one metric."""

    text: str
    method: str
    baseline: str
    metric: str
    """results.json key: base_acc, novel_acc, hm or local_acc."""
    paper_delta: float
    """method minus baseline in the paper's ablation (7 datasets, few-shot non-IID, CLIP ViT-B/16)."""


# DESIGN.md, "Paper headline": FedLoRA 78.32/78.86/78.56; + decoupled 86.42/79.52/82.60;
# + two-stage only 79.46/83.84/81.47; full 90.06/83.58/86.51 (Base/Novel/HM).
PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim("decoupling raises Base", "feddtl-decoupled", "fedlora", "base_acc", 86.42 - 78.32),
    Claim("decoupling raises Base, with the RL stage", "feddtl", "feddtl-twostage", "base_acc", 90.06 - 79.46),
    Claim("SFT → RL raises Novel", "feddtl-twostage", "fedlora", "novel_acc", 83.84 - 78.86),
    Claim("SFT → RL raises Novel, with decoupling", "feddtl", "feddtl-decoupled", "novel_acc", 83.58 - 79.52),
    Claim("FedDTL's HM is above FedLoRA's", "feddtl", "fedlora", "hm", 86.51 - 78.56),
)


def claim_outcome(v: Verdict, paper_delta: float) -> str:
    """'holds' when the measured difference has the paper's sign beyond a tie, 'reversed' when it has
    the opposite sign beyond a tie, else 'tie'."""
    outcome = v.outcome
    if outcome in ("tie", "n/a"):
        return outcome
    return "holds" if (v.delta > 0) == (paper_delta > 0) else "reversed"


def signed(value: float) -> str:
    return "—" if value != value else f"{value:+.2f}".replace("-", "−")
