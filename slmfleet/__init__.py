"""The ``slmfleet`` command: the one entry point above the agent, the controller and the simulations.

It composes their command lines (see ``slmfleet.cli``) and is the only package allowed to import all
three (docs/ARCHITECTURE.md, "Packages and import rules").
"""
