"""The driver's control: one attempt, the controller's states and the failure policy (no torch)."""
