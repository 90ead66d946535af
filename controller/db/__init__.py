"""Persistence: engine, tables, migrations."""
