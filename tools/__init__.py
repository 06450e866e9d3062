"""Operator and developer scripts (benchmarks, fixture builders). Not imported by the package."""
