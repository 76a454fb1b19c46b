"""The Ray layer: worker actors, the worker group, and the coordinator (its core is torch-free)."""
