"""Benchmarks (offline engine, any OpenAI-compatible server) and the hardware facts behind `ember recommend`."""
