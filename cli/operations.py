"""Operator commands: jobs, dead letters, workers, pruning, roles and the audit trail."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the operator command groups to the root ``pgqueue`` app."""
