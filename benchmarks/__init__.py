"""The benchmark harness. Not built yet (see the README)."""
