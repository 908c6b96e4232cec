"""KV transfer between engines (disaggregated prefill/decode): the KV-connector API
(`connector.py`), its config (`config.py`), the registry (`factory.py`) and the ZeroMQ pull
connector (`zmq_pull.py` scheduler half, `zmq_pull_worker.py` worker half). See
docs/disaggregation.md."""
