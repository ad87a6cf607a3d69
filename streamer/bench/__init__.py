"""Benchmarks: python -m streamer.bench antialias|codec|call."""
