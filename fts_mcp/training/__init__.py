"""Training: the job spec (pure, imported by the server) and the recipe (torch side, imported by workers only)."""
