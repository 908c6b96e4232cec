"""Helpers that build small models in real Hugging Face format, for tests and benchmarks."""
