"""One figure as a typed record: its value, 95 % interval, the same figure between real images (the reference), the
image counts behind it and the protocol it was measured with; `to_json()` gives the JSON of `meddiff evaluate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Figure:
    """value; interval (lo, hi) or None; reference: what real images score against real images (None: not
    measured); counts: {"n_fake", "n_real", ...}; protocol: the recipe (None: the evaluation's shared protocol);
    details: the figure's own JSON-ready extras (SSIM's median and band, PRDC's k, ...)."""

    value: float | None
    interval: tuple[float, float] | None = None
    reference: float | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    protocol: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_fake(self) -> int | None:
        return self.counts.get("n_fake")

    @property
    def n_real(self) -> int | None:
        return self.counts.get("n_real")

    def to_json(self) -> dict[str, Any]:
        """{"value", "ci95": [lo, hi] | None, "reference", the counts, the details, "protocol" when set}."""
        out: dict[str, Any] = {"value": self.value, "ci95": list(self.interval) if self.interval else None,
                               "reference": self.reference, **self.counts, **self.details}
        if self.protocol is not None:
            out["protocol"] = self.protocol
        return out


def json_or_none(fig: Figure | None) -> dict[str, Any] | None:
    """`fig.to_json()`, or None for a figure the counts could not carry."""
    return None if fig is None else fig.to_json()
