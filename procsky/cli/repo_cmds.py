"""Subcommands (placeholder until implemented)."""

from procsky.cli import main  # noqa: F401
