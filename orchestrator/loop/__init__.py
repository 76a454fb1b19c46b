"""The per-rank training loop and its named Stateful components (torch, no ray)."""
