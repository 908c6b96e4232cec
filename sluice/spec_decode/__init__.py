"""Speculative decoding: proposers (engine-side n-gram lookup, a draft model in the worker)
and the rejection sampler (`sluice.sample.rejection`) that keeps the target distribution."""
