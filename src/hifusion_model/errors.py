"""The project's own exceptions.

Every error a user can cause (a bad file, a missing µm/px, a foreign checkpoint) is a
:class:`HiFusionError`: the CLI prints its message as one line and exits with 2, the napari
plugin shows it as a notification. Messages name the file and say what to do.
"""

from __future__ import annotations


class HiFusionError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(HiFusionError, ValueError):
    """An invalid model or training configuration."""


class CheckpointError(HiFusionError):
    """A checkpoint that is missing, truncated, corrupt, foreign or unsafe."""


class SlideError(HiFusionError):
    """An image that cannot be opened or read, or lacks a needed µm/px."""


class SectionError(HiFusionError):
    """Spots, counts or a section file that are missing, inconsistent or invalid."""


class Cancelled(HiFusionError):
    """Raised inside long jobs when the caller's cancel callback asks to stop."""


class OutputError(HiFusionError):
    """An output that would replace an input or an existing file, or that cannot be written."""
