"""Shared helpers for the tests (tiny training runs)."""
