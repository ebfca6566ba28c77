"""Credits are exact decimals with six places, never floats."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.000001")


def q(amount: Decimal) -> Decimal:
    """`amount` rounded half up to the ledger's six places."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP)
