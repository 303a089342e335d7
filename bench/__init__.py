"""Benchmarks: `make bench` (python -m bench [name ...]). Each prints side-by-side ratios."""
