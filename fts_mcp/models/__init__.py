"""Base models: naming them (`refs`, pure, used by the server) and loading them (`loading`, torch side)."""
