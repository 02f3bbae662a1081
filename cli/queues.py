"""`pgqueue queues`: list, pause, resume and limit queues."""

from __future__ import annotations

import typer

queues_app = typer.Typer(help="List queues and change their settings (pause, limits).")
