"""`ember bench` registration for the CLI."""
from .bench import add_parser  # noqa: F401
