"""The frozen configuration tree: one sub-config per concern, one root `EngineConfig`.

Every field is declared with `option(...)` (`config_fields.py`: how a field is declared and
checked), which records its help text, allowed choices and CLI flag name; `config_sources.py`
generates the CLI flags, the `--config` file keys and the `SLUICE_*` environment variables from
these declarations (there is no second flat list).

Rules: configs are frozen and validated once (`EngineConfig.validate` via `config_sources`);
runtime facts (number of KV blocks, final max_model_len) travel separately (`EngineReady`) and are
never written back. Pass sub-configs, not the root, to components that need only one concern.
This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
from typing import Any, Literal

from sluice.config_fields import FieldSpec, field_specs_of, option
from sluice.errors import ConfigError


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = option(None, "The model: a local directory in Hugging Face format "
                               "(config.json, *.safetensors, tokenizer), a Hugging Face hub id "
                               "such as Qwen/Qwen2.5-0.5B-Instruct (downloaded once, or read "
                               "from the local cache with HF_HUB_OFFLINE=1), or a .gguf file. "
                               "Default: the built-in demo model.")
    tokenizer: str | None = option(None, "Tokenizer directory or hub id; defaults to the "
                                   "model's (for a .gguf file, the tokenizer in the file).")
    served_model_name: tuple[str, ...] = option(
        default_factory=tuple, help="Name(s) the API answers to (space or comma separated); "
        "the first is the one reported. Default: the model as given.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of a hub model. "
                                  "Default: main.")
    dtype: str = option("auto", "Weight and activation dtype. On CPU (--kernels auto) "
                        "bfloat16/float16 store the linear layers', embedding's and LM head's "
                        "weights in 16 bits and compute activations in float32 (bf16 GEMMs on "
                        "AMX/AVX-512-BF16, a bf16-weight GEMV everywhere). 'auto': on CPU a "
                        "bfloat16 checkpoint's dtype where the CPU has AMX-BF16 or "
                        "AVX-512-BF16, else float32; on CUDA the checkpoint's dtype. vLLM's "
                        "spellings 'half' (float16) and 'float' (float32) are accepted.",
                        choices=DTYPES)
    quantization: str | None = option(
        None, "How quantized weights run (vLLM's flag). Unset: as stored; for a .gguf model "
        "the Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS weights of the "
        "linear layers, embedding and LM head stay in their blocks and are dequantized on the fly inside sluice's CPU kernels "
        "(with --kernels auto on CPU in float32; llama.cpp's memory), other tensors are "
        "dequantized to --dtype at load; these blocks multiply activations "
        "quantized to int8 per 32 values, as llama.cpp does (on an x86 CPU with AVX2 or AVX512-VNNI at "
        "every step, on blocks regrouped at load for vpdpbusd; elsewhere in decode steps of "
        "up to 8 rows); linear layers in a type without kernels of its own (IQ1/IQ2/IQ3, "
        "TQ1_0/TQ2_0, MXFP4, NVFP4, Q1_0) are dequantized, or where int8 activations run at "
        "every step re-encoded exactly as blocks of a kernel type (TQ1_0/TQ2_0 as Q2_K, IQ3_S "
        "as Q5_K, IQ3_XXS/IQ1_S/IQ1_M as Q6_K, MXFP4 as Q5_0, Q1_0 as Q4_0, where the block "
        "scales fit) or else quantized again to Q8_0 blocks. "
        "'gguf': keep the GGUF blocks in any case (without the C++ kernels a slow pure-torch "
        "reference), with float activations. 'none': dequantize every GGUF tensor to "
        "--dtype at load (the float path). "
        "'int8': the decoder's linear weights quantized at load to int8 with one scale per "
        "32 weights of an output channel (llama.cpp's Q8_0 blocks), decode steps' "
        "activations to int8 per 32 values (integer dot products, as llama.cpp); prefill "
        "and batched steps (more than 8 rows) multiply in bf16 (on AMX where the CPU has "
        "it), or on an x86 CPU with AVX2 or AVX512-VNNI take int8 activations too (vpdpbusd on the Q8_0 "
        "blocks regrouped at load), embedding and LM head stay float. A .gguf model keeps "
        "its blocks, which (LM head included) decode with int8 activations (with "
        "AVX2 or AVX512-VNNI: every step). A compressed-tensors checkpoint (vLLM's "
        "format: W8A8 int8, W4A16 int4) runs its integers in those block kernels with int8 "
        "activations when unset or 'int8', as stored with 'compressed-tensors' (vLLM's name, "
        "accepted for such a checkpoint only: W4A16 then keeps float activations), and is "
        "dequantized to --dtype with 'none'. GPTQ (4- or 8-bit) and AWQ (4-bit) checkpoints "
        "likewise, 'gptq' / 'awq' keeping their float activations (act-order GPTQ: blocks over "
        "the inputs sorted by group); 8-bit GPTQ with zero points dequantizes to --dtype at "
        "load. An FP8 checkpoint (quant_method fp8 / modelopt, compressed-tensors "
        "float-quantized) is dequantized to --dtype at load (the fast float GEMMs), runs as "
        "int8 blocks with 'int8', and keeps its e4m3 weights (9 bits each) in sluice's block "
        "kernels, float activations, with its format's name (fp8 / modelopt / "
        "compressed-tensors, accepted for such a checkpoint only).",
        choices=("gguf", "none", "int8", "compressed-tensors", "gptq", "awq", "fp8", "modelopt"))
    max_model_len: int | None = option(None, "Maximum tokens per request (prompt + output). "
                                       "Default: the model's max_position_embeddings.", ge=1)
    seed: int = option(0, "Global random seed for sampling without a per-request seed.", ge=0)
    max_logprobs: int = option(20, "Largest `logprobs`/`prompt_logprobs` a request may ask "
                               "for.", ge=0)
    generation_config: str = option("auto", "Default sampling parameters (temperature, top_p, "
                                    "top_k, min_p, repetition_penalty, max_new_tokens as "
                                    "max_tokens), as vLLM: 'auto' takes them from the model's "
                                    "generation_config.json, 'vllm' uses sluice's own defaults, "
                                    "a directory path reads its generation_config.json. They "
                                    "fill what a request leaves unset (server), or apply when "
                                    "LLM.generate/chat get no SamplingParams.")
    enable_sleep_mode: bool = option(False, "Serve POST /sleep?level=N (N 1 or 2), POST /wake_up and GET "
                                     "/is_sleeping (as vLLM). Level 1 frees the KV cache, level "
                                     "2 the weights too (reloaded from disk on wake-up); only "
                                     "when no request is in flight (else 409).")
    chat_template: str | None = option(None, "Chat template for every chat request (and "
                                       "LLM.chat) instead of the tokenizer's: a file path, or "
                                       "the Jinja template itself. Checked at startup.")
    trust_remote_code: bool = option(False, "Accepted for vLLM compatibility, with no effect: "
                                     "sluice runs only its native architectures and never runs "
                                     "code from a model repository; a model whose config needs "
                                     "remote code (auto_map, an architecture sluice lacks) is "
                                     "refused with or without this flag.")
    structured_outputs_config: str | None = option(
        None, "Structured-output (grammar) backend settings as vLLM's JSON object, e.g. "
        "'{\"backend\": \"guidance\", \"disable_any_whitespace\": false, "
        "\"disable_additional_properties\": false}'. backend: guidance (llguidance) or auto "
        "(the same); xgrammar is not available. Default: guidance.")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int | None = option(None, "Tokens per KV-cache block. Default: the platform's, "
                                    "64 on CPU (longer contiguous runs for the attention "
                                    "kernels to sweep), 16 on CUDA.",
                                    choices=(8, 16, 32, 64, 128))
    enable_prefix_caching: bool = option(True, "Reuse KV blocks across requests that share a "
                                         "prompt prefix.")
    kv_cache_memory: int | None = option(None, "Bytes of KV cache, e.g. '4GiB' or '512MiB'. "
                                         "Default: --kv-cache-memory-fraction of free memory.",
                                         byte_size=True, ge=1)
    kv_cache_memory_fraction: float = option(0.3, "Fraction of free device memory (measured "
                                             "after loading and profiling) given to the KV cache "
                                             "when neither --kv-cache-memory nor "
                                             "--gpu-memory-utilization is set.", gt=0, le=1)
    gpu_memory_utilization: float | None = option(
        None, "vLLM's memory budget: the fraction of device memory for the weights, the "
        "activation peak and the KV cache together (on CUDA: of total device memory; on CPU: of "
        "the RAM available when the engine starts); the KV cache gets what the rest leaves. "
        "Ignored when --kv-cache-memory is set; replaces --kv-cache-memory-fraction when set.",
        gt=0, le=1)
    kv_cache_dtype: str = option("auto", "dtype the KV cache is stored in; 'auto' is --dtype "
                                 "(fp8_e4m3 for a checkpoint that declares fp8 KV scales, as "
                                 "in vLLM; float16 for a GGUF file run with int8 activations "
                                 "(its default, or --quantization int8), as llama.cpp). "
                                 "bfloat16/float16 halve the cache's "
                                 "memory per token of float32, fp8 (= fp8_e4m3: 3 mantissa "
                                 "bits, range +-448) and fp8_e5m2 (2 bits, +-57344) halve it "
                                 "again: k/v are stored divided by the checkpoint's per-layer "
                                 "KV-cache scales (k_scale / v_scale), else with scale 1 "
                                 "(vLLM's default), saturated to the format's range; other "
                                 "caches do not use such scales. Attention computes in the "
                                 "activations' dtype.",
                                 choices=("auto", "float32", "bfloat16", "float16", "fp8_e4m3",
                                          "fp8_e5m2"))
    swap_space: float | None = option(None, "vLLM's CPU swap space for preempted requests, in "
                                      "GiB. Accepted with no effect (logged at startup): sluice "
                                      "preempts by freeing a request's blocks and recomputing "
                                      "them later, never by swapping.", ge=0)
    kv_events_config: str | None = option(
        None, "Publish KV-cache events (BlockStored / BlockRemoved / AllBlocksCleared, vLLM's "
        "shapes, msgpack) on a ZeroMQ PUB socket, for KV-aware routers: a JSON object with "
        "vLLM's keys, e.g. '{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", "
        "\"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": \"tcp://*:5558\"}' "
        "(also buffer_steps: batches kept for replay, hwm, max_queue_size, topic). Off when "
        "unset.")
    kv_transfer_config: str | None = option(
        None, "A KV connector for disaggregated prefill/decode: a JSON object with vLLM's "
        "keys, e.g. '{\"kv_connector\": \"ZmqPullConnector\", \"kv_role\": "
        "\"kv_producer\", \"kv_ip\": \"127.0.0.1\", \"kv_port\": 14579}' (kv_role: "
        "kv_producer | kv_consumer | kv_both; also engine_id, kv_connector_extra_config: "
        "lease_seconds, transfer_timeout_seconds, advertise_host). See docs/disaggregation.md. "
        "Off when unset.")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(256, "Maximum number of requests running in one step.", ge=1)
    max_num_batched_tokens: int | None = option(None, "Token budget of one step (prefill chunks "
                                                "+ decodes). Default: max(2048, max_num_seqs).",
                                                ge=1)
    scheduling_policy: str = option("fcfs", "Order of admission and preemption.",
                                    choices=("fcfs", "priority"))
    enable_chunked_prefill: bool = option(True, "Split long prompts across steps to fit the "
                                          "token budget.")
    max_num_queued_requests: int | None = option(None, "Reject new requests (HTTP 429, with "
                                                 "Retry-After) when this many sequences "
                                                 "(prompts x n) are already waiting.", ge=1)
    speculative_config: str | None = option(
        None, "Speculative decoding as vLLM's JSON object: '{\"method\": \"ngram\", "
        "\"num_speculative_tokens\": 4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": "
        "5}', or a draft model sharing the model's tokenizer: '{\"model\": PATH_OR_ID, "
        "\"num_speculative_tokens\": 4}' (also disable_by_batch_size: no speculation in a "
        "step with at least that many running requests; default 4). Greedy outputs are "
        "unchanged and sampled ones keep the model's distribution. See "
        "docs/speculative_decoding.md. Off when unset.")

    @property
    def token_budget(self) -> int:
        """The effective per-step token budget."""
        return self.max_num_batched_tokens or max(2048, self.max_num_seqs)


EXECUTOR_BACKENDS = ("uni", "mp", "ray")
MULTINODE_MASTER_PORT = 29501   # vLLM's default --master-port


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks run the model, and how they are started and meet.

    world_size = tensor_parallel_size x pipeline_parallel_size ranks; rank 0 is the driver
    (see `sluice.distributed.parallel_state.ParallelLayout`)."""

    tensor_parallel_size: int = option(1, "Number of tensor-parallel ranks: each layer's "
                                       "weights are split over this many worker processes "
                                       "(-tp).", ge=1)
    pipeline_parallel_size: int = option(1, "Number of pipeline-parallel stages (-pp): the "
                                         "decoder layers are split into this many contiguous "
                                         "ranges, one per stage (the first also embeds, the "
                                         "last holds the final norm and LM head), and as many "
                                         "batches are kept in flight.", ge=1)
    pp_layer_partition: str | None = option(
        None, "Layers per pipeline stage, comma separated (e.g. '3,5'; they must add up to the "
        "model's layer count; vLLM's VLLM_PP_LAYER_PARTITION). Default: an even split, the "
        "remainder going to the stages before the last.")
    data_parallel_size: int = option(
        1, "Number of data-parallel engines (-dp): this many engine-core processes behind one "
        "API server, each a full copy of the model (itself -tp x -pp ranks, with its own "
        "workers and rendezvous port). Each request goes to the engine with the fewest "
        "outstanding requests, or, while that keeps it within 4 requests of the least-loaded "
        "engine, to the engine that last served the longest prefix of its prompt (prefix-cache "
        "affinity). --kv-cache-memory applies to each engine; --num-threads (default: all "
        "usable CPUs) is split evenly over the engines.", ge=1)
    data_parallel_rank: int | None = option(
        None, "vLLM's external load-balancing mode (-dpn): this server runs only engine R of a "
        "--data-parallel-size group, as its own server (its metrics labelled engine=\"R\", its "
        "KV-event ports shifted by R); a load balancer in front spreads requests over the "
        "group's servers. Default: this server runs all --data-parallel-size engines.", ge=0)
    distributed_executor_backend: str | None = option(
        None, "How the ranks run: 'uni' (one worker inside the engine-core process; one rank "
        "only), 'mp' (one worker process per rank, on this machine or over --nnodes machines), "
        "'ray' (one Ray actor per rank in a placement group on the Ray cluster at $RAY_ADDRESS, "
        "else a local Ray instance; needs `pip install sluice[ray]`). Default: uni for one "
        "rank, mp for more. A worker that dies stops the engine (HTTP 503, the server exits "
        "non-zero), and so does a step that takes longer than $SLUICE_EXECUTE_MODEL_TIMEOUT "
        "seconds (default 300).",
        choices=EXECUTOR_BACKENDS)
    nnodes: int = option(1, "Number of machines (nodes) the mp executor's ranks run on, "
                         "world_size / nnodes ranks each: node 0 runs the API server, the "
                         "engine core and ranks [0, world_size/nnodes); node k runs the next "
                         "share as `sluice serve --headless --node-rank k` with the same "
                         "--nnodes, --master-addr and --master-port.", ge=1)
    node_rank: int = option(0, "This machine's node index, 0 to --nnodes minus 1 (0: the head, "
                            "which runs the engine; the others run with --headless).", ge=0)
    master_addr: str = option("127.0.0.1", "Address of rank 0's rendezvous: the TCP store "
                              "where the ranks meet to form their process groups. With "
                              "--nnodes > 1: node 0's address as the other nodes reach it "
                              "(node 0 binds its executor's sockets there).")
    master_port: int | None = option(None, "Port of that rendezvous. With --nnodes > 1 the "
                                     "head also listens on the next port (master port + 1) for "
                                     "headless nodes to join. Default: a free port picked at "
                                     "startup on one node, 29501 (vLLM's) with --nnodes > 1.",
                                     ge=1, le=65535)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def engine_indexes(self) -> tuple[int, ...]:
        """The data-parallel engines this process runs: all of them, or only
        --data-parallel-rank's (a `dp_engine_config` carries its own rank)."""
        if self.data_parallel_rank is not None:
            return (self.data_parallel_rank,)
        return tuple(range(self.data_parallel_size))

    @property
    def output_rank(self) -> int:
        """The rank whose `ModelRunnerOutput` is the step's result: the driver (tp rank 0) of
        the last pipeline stage, which samples (rank 0 without pipeline parallelism)."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    @property
    def executor_backend(self) -> str:
        """`distributed_executor_backend`, resolved: 'uni' for one rank, else 'mp'."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"

    @property
    def ranks_per_node(self) -> int:
        """Ranks on each node (all of them on one node)."""
        return self.world_size // self.nnodes

    @property
    def rendezvous_port(self) -> int | None:
        """`master_port`, resolved: vLLM's 29501 with --nnodes > 1 (every node must agree on
        it), else None (a free port picked by the head)."""
        if self.master_port is None and self.nnodes > 1:
            return MULTINODE_MASTER_PORT
        return self.master_port


@dataclass(frozen=True)
class DeviceConfig:
    device: str = option("auto", "Device to run on; 'auto' picks CUDA when present, else CPU.",
                         choices=("auto", "cpu", "cuda"))
    num_threads: int | None = option(None, "CPU threads for torch compute, split evenly over "
                                     "the data-parallel engines, then over the ranks (at least "
                                     "one each) when several worker processes run. "
                                     "Default: the number of CPUs in this process's affinity "
                                     "mask.", ge=1)
    kernels: str = option("auto", "Compute kernels: 'auto' uses the platform's fast operators "
                          "(on CPU: sluice's C++ paged attention, tiled GEMM and fused "
                          "elementwise ops, built at install time for AVX2 and AVX-512 and "
                          "chosen by what the CPU reports; compiled once per machine where no "
                          "prebuilt build runs; pure torch if no compiler); "
                          "'torch' uses pure-torch ops only (the reference path).",
                          choices=("auto", "torch"))
    enforce_eager: bool = option(False, "vLLM's switch to turn off CUDA graphs. Accepted with no "
                                 "effect (logged at startup): sluice always runs the model "
                                 "eagerly (no CUDA graphs, no torch.compile).")


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = option("auto", "Weight format: 'auto' reads safetensors files, or the "
                              "GGUF file a .gguf model names; 'gguf' insists on a GGUF file; "
                              "'dummy' fills random weights (for testing).",
                              choices=("auto", "safetensors", "gguf", "dummy"))
    download_dir: str | None = option(None, "Where hub models are downloaded and looked up. "
                                      "Default: the Hugging Face cache (HF_HUB_CACHE).")
    hf_token: str | None = option(None, "Hugging Face token for gated or private hub models. "
                                  "Default: HF_TOKEN or the token saved by `hf auth login`.")


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "Address the HTTP server binds.")
    port: int = option(8000, "Port the HTTP server binds (0 picks a free port).", ge=0,
                       le=65535)
    api_key: str | None = option(None, "Require 'Authorization: Bearer <key>' on every route "
                                 "except /health and /ping (and /metrics with "
                                 "--public-metrics).")
    public_metrics: bool = option(False, "Serve /metrics without the API key (for scrapers "
                                  "that cannot send one).")
    allowed_origins: tuple[str, ...] = option(default_factory=tuple, help="CORS origins allowed "
                                              "(comma separated); CORS is off when empty.")
    max_request_body_bytes: int = option(8 * 2**20, "Largest request body accepted, e.g. "
                                         "'8MiB'; larger ones get HTTP 413 unread.",
                                         byte_size=True, ge=1024)
    max_n: int = option(128, "Largest `n` (and `best_of`) one request may ask for.", ge=1)
    max_prompt_chars: int | None = option(None, "Longest text prompt (or rendered chat) in "
                                          "characters, checked before tokenization. Default: "
                                          "32 x max_model_len.", ge=1)
    trust_request_chat_template: bool = option(False, "Render chat templates sent in requests "
                                               "(under a time limit); otherwise such requests "
                                               "get HTTP 400.")
    uvicorn_log_level: str | None = option(None, "Log level of uvicorn (the HTTP server's "
                                           "startup lines and access log). Default: --log-level.",
                                           choices=("critical", "error", "warning", "info",
                                                    "debug", "trace"))
    root_path: str | None = option(None, "The path prefix a reverse proxy strips before "
                                   "forwarding (ASGI root_path): routes still answer at /v1/..., "
                                   "and generated URLs (/docs, /openapi.json) carry the prefix.")
    ssl_keyfile: str | None = option(None, "Private key file (PEM) for HTTPS; needs "
                                     "--ssl-certfile.")
    ssl_certfile: str | None = option(None, "Certificate file (PEM) for HTTPS; with it the "
                                      "server speaks only HTTPS.")
    shutdown_timeout: float = option(5.0, "On SIGTERM/SIGINT: seconds in-flight requests may "
                                     "run on (new ones get 503) before the rest are ended with "
                                     "an error.", ge=0)
    enable_auto_tool_choice: bool = option(False, "Let the model decide when to call tools "
                                           "(tool_choice 'auto', the default when a chat "
                                           "request sends tools): its output is parsed by "
                                           "--tool-call-parser. Without it such requests get "
                                           "HTTP 400.")
    tool_call_parser: str | None = option(None, "How tool calls are found in a model's output "
                                          "for tool_choice 'auto' (vLLM's names): 'hermes' "
                                          "(<tool_call>{...}</tool_call>: Hermes, Qwen 2.5/3) "
                                          "or 'llama3_json' (Llama 3.x JSON calls), or a name "
                                          "registered by --tool-parser-plugin.")
    tool_parser_plugin: str | None = option(None, "A Python file that registers a tool parser "
                                            "(@ToolParserManager.register_module('name') on a "
                                            "ToolParser subclass, from "
                                            "sluice.entrypoints.openai.tool_parsers); use its "
                                            "name with --tool-call-parser.")


@dataclass(frozen=True)
class ObservabilityConfig:
    log_level: str = option("info", "Logging level.",
                            choices=("debug", "info", "warning", "error"))
    disable_log_stats: bool = option(False, "Do not log periodic throughput/cache statistics.")
    disable_log_requests: bool = option(True, "Do not log each request's arrival (id, prompt, "
                                        "sampling parameters) and abort; "
                                        "--no-disable-log-requests (or vLLM's "
                                        "--enable-log-requests) turns that log on.")
    max_log_len: int | None = option(None, "Characters of the prompt (and prompt token ids) "
                                     "shown in a request's log line. Default: all.", ge=0)


@dataclass(frozen=True)
class LoRAConfig:
    enable_lora: bool = option(False, "Serve LoRA adapters (PEFT format) over the base model: "
                               "requests name one as `model` (or `lora_request` offline).")
    lora_modules: tuple[str, ...] = option(
        default_factory=tuple, help="Adapters loaded at startup: 'name=path', or vLLM's JSON "
        "form '{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'.")
    max_loras: int = option(1, "Most distinct adapters that run in one step (others wait).",
                            ge=1)
    max_lora_rank: int = option(16, "Largest adapter rank accepted.", ge=1, le=64)
    max_cpu_loras: int | None = option(None, "Adapters kept loaded (least recently used one "
                                       "evicted beyond that); default --max-loras.", ge=1)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
    "parallel": ParallelConfig, "device": DeviceConfig, "load": LoadConfig,
    "server": ServerConfig, "observability": ObservabilityConfig, "lora": LoRAConfig,
}


@dataclass(frozen=True)
class EngineConfig:
    """The root of the tree. Build it with `config_sources.build_engine_config(...)` or
    `EngineConfig.from_kwargs(...)`, which validate; never construct sub-configs ad hoc."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build and validate from flat field names (as `LLM(**kwargs)` receives them)."""
        from sluice.config_sources import build_engine_config
        return build_engine_config(overrides=kwargs)

    def validate(self) -> None:
        """Check every field (type, choices, range) and the cross-field rules; raise one
        `ConfigError` listing every problem. Useful after `dataclasses.replace`."""
        problems: list[str] = []
        bad: set[str] = set()
        for spec in field_specs().values():
            value = getattr(getattr(self, spec.section), spec.name)
            reason = spec.check(value)
            if reason is not None:
                bad.add(spec.name)
                problems.append(f"{spec.flag}: {value!r} {reason}; allowed: {spec.allowed()}.")
        from sluice.config_rules import cross_field_problems   # it imports this module
        problems += cross_field_problems(self, skip=bad)
        if problems:
            raise ConfigError(problems)


Section = Literal["model", "cache", "scheduler", "parallel", "device", "load", "server",
                  "observability", "lora"]


@functools.cache
def field_specs() -> dict[str, FieldSpec]:
    """Every config field by its (unique) name, in declaration order of SECTIONS."""
    return field_specs_of(SECTIONS)
