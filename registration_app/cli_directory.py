"""Operator commands for the directory: reconcile, bulk provisioning, CRL (issue 5 grows this)."""

from __future__ import annotations

import click


def register(main: click.Group, sync: click.Group) -> None:
    """Attach this module's commands to `autoenroll` and `autoenroll sync`."""
