"""Adapters after training: inspecting, merging and combining them (merging runs in a worker)."""
