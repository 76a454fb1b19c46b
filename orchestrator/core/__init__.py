"""Leaves: validated configuration, typed specs, the event vocabulary, metrics and redaction (no torch, no ray)."""
