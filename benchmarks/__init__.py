"""Benchmarks run by hand (never in CI): `python -m benchmarks.<name> --help`. See BENCHMARKS.md."""
