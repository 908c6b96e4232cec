"""`sluice router`: a KV-aware OpenAI front over several engines (aggregated mode), or over
prefill and decode workers (disaggregated mode, `disagg.py`).

    client ─HTTP─► router (app.py) ─ routing.py picks a worker ─HTTP─► sluice serve ×N
                     ▲  workers.py: registry, load, canary /health
                     └─ kv_index.py: per-worker block hashes ◄─ZMQ─ each worker's KV events

Modules: `cli.py` (flags, startup), `app.py` (routes, proxying), `routing.py` (round-robin,
least-load, kv cost), `workers.py` (registration, health), `kv_index.py` (event subscriber and
index), `disagg.py` (the prefill → decode hops), `metrics.py` (/metrics). Torch-free; no tokenizer is loaded (the workers tokenize).
"""
