"""The edge: a versioned adapter store, and a runtime that serves many adapters on one base model."""
