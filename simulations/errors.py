"""The simulator's exceptions."""

from __future__ import annotations


class SimulationError(Exception):
    """A simulation could not run; the message says what was wrong and what to do."""


class ScenarioError(SimulationError):
    """The scenario file is invalid or refers to something that does not exist."""
