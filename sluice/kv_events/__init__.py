"""Publishing KV-cache events (`--kv-events-config`), as vLLM's `vllm.distributed.kv_events`.

    EngineCore.step ─ take_events() ─► publisher.publish(KVEventBatch)   (a queue put: O(1))
                                            │ publisher thread
                                            ├─► PUB     [topic, seq (8 bytes, big endian), msgpack batch]
                                            └─◄ ROUTER  replay: [id, "", start seq] → every buffered
                                                         batch with seq >= start, then END_SEQ

`config.py` parses the JSON option (torch-, zmq- and core-free: the API server validates the
flag); `publisher.py` holds the null and ZeroMQ publishers (imported by the engine core only).
The event structs live with the block pool that records them (`sluice.core.kv_cache.events`).
This package imports nothing at import time; import the submodules. No torch.
"""
