"""Operator authentication: bearer tokens with roles."""
