"""Run storage through fsspec, its error classification, run.json/events.jsonl, and the backup commit protocol (no torch, no ray)."""
