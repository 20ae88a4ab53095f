"""Benchmarks that measure Kiln and write BENCHMARKS.md (``kiln bench SUITE``).

Never part of the test suite's pass/fail."""
