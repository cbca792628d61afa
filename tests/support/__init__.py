"""Helpers shared by every test tier, the benchmarks and the demo: the one copy of each."""
