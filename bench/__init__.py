"""Benchmarks (not tests): speed and memory ratios, printed as tables and written under results/bench/."""
