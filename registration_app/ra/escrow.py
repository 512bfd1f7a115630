"""The key authority's pending escrows (authorities/kra.py, the two-phase escrow of a split deployment):
`autoenroll escrow sweep` runs one sweep now, the one the KRA's thread runs every minute."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..authorities.kra import LocalKRA
from ..core.errors import ConfigError

if TYPE_CHECKING:
    from ..wiring import Services


def sweep_escrows(services: Services) -> dict[str, list[str]]:
    """One sweep of the pending escrows by the CA's records: the serials it confirmed and voided. Only where
    the KRA is (role kra or all): an RA or a CA holds no escrow to settle."""
    if services.role not in ("kra", "all") or not isinstance(services.kra, LocalKRA):
        raise ConfigError(f"`autoenroll escrow sweep` runs where the key authority is (role kra or all), "
                          f"not role {services.role!r}")
    return services.kra.settle_pending()
