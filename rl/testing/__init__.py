"""Builders for tests and benchmarks (tiny random SD1.5 weights); never imported by the product."""
