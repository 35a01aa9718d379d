"""Metrics and dashboard tests."""
