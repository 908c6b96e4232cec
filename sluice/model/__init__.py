"""Our model code: layers, paged attention, architectures and the weight loader.

What the worker / model runner does with it, once per engine:

    spec  = hf_config.load_model_spec(model_dir)
    dtype = loader.resolve_dtype(model_config.dtype, spec, device)
    model = loader.load_model(spec, dtype, device, load_config.load_format,
                              max_model_len=max_model_len)
    kv_caches = attention.allocate_kv_caches(spec, num_blocks, block_size, dtype, device,
                                             tp_size=get_tp_group().size)

and once per step (all scheduled tokens flattened, requests in any order and mix):

    meta = attention.build_attention_metadata(query_start_loc, seq_lens, block_table,
                                              slot_mapping, block_size, device)
    with torch.inference_mode(), attention.set_forward_context(meta, kv_caches):
        hidden = model(input_ids, positions)                   # [T, hidden_size]
    logits = model.compute_logits(hidden[logits_indices])      # [n, vocab] float32 (None
                                                               # on TP ranks other than 0)
    tokens = model.greedy_tokens(hidden[logits_indices])       # [n] argmax, or None (no
                                                               # screen: use the logits)

Under tensor parallelism (`sluice.distributed` initialised before the model is built) every
TP rank runs the same calls on its shard; the layers read their group at construction. Under
pipeline parallelism each stage builds its layer range (`load_model(..., layer_range=)`),
allocates caches for those layers only (`allocate_kv_caches(..., num_layers=)`), takes the
previous stage's hand-off (`model(input_ids, positions, intermediate)`) and returns its own;
only the last stage computes logits.

Modules import torch; nothing here imports `core/`.
"""
