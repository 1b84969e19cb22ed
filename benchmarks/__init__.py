"""Benchmarks: each prints one JSON object as its last line (see BENCHMARKS.md)."""
