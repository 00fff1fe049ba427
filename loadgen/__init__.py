"""Load generator and benchmarks for OpenAI-compatible endpoints."""
