"""Benchmarks behind `megatron-vr1 bench <name>`; each prints a table."""
