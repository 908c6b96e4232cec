#!/usr/bin/env bash
# Disaggregated prefill/decode on one machine: a `sluice router` in disaggregated mode in front of
# one prefill worker (kv_producer) and one decode worker (kv_consumer). The router sends each
# prompt to the prefill worker (max_tokens=1, kv_transfer_params {"do_remote_decode": true}); the
# decode worker pulls the prompt's KV blocks from it over ZeroMQ/TCP (ZmqPullConnector) and
# generates, streaming through the router.
#
#   examples/disagg.sh                 # router on :8000, prefill on :8001, decode on :8002
#   PORT=9000 examples/disagg.sh       # router on :9000, workers on :9001 and :9002
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct examples/disagg.sh
#
# Ctrl-C stops the router and both workers. Logs: $LOG_DIR (default a temporary directory).
#
# On several hosts: start the prefill worker with --host 0.0.0.0 and a kv_ip of "0.0.0.0" plus
# "kv_connector_extra_config": {"advertise_host": "PREFILL_HOST"} (the address decode workers
# dial; its block server listens on kv_port), the decode worker with --host 0.0.0.0, and give the
# router --prefill http://PREFILL_HOST:PORT --decode http://DECODE_HOST:PORT (or register them
# later: curl -X POST ROUTER/workers -d '{"url": ..., "role": "prefill"}'). Both workers must run
# the same model, dtype, block size and tensor-parallel size (checked per request).
set -euo pipefail

PORT="${PORT:-8000}"
MODEL="${MODEL:-}"                      # empty: the built-in demo model
KV_PORT="${KV_PORT:-14579}"             # the prefill worker's block server (ZeroMQ ROUTER)
SLUICE="${SLUICE:-sluice}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t sluice-disagg.XXXXXX)}"
THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))   # the two workers share the cores

# shellcheck source=examples/_processes.sh
source "$(dirname "${BASH_SOURCE[0]}")/_processes.sh"   # pids, stop (on exit), wait_healthy

start_worker() {   # NAME HTTP_PORT KV_ROLE
    local config="{\"kv_connector\": \"ZmqPullConnector\", \"kv_role\": \"$3\", \"kv_ip\": \"127.0.0.1\", \"kv_port\": $KV_PORT}"
    # shellcheck disable=SC2086  # MODEL is empty or one word
    $SLUICE serve $MODEL --host 127.0.0.1 --port "$2" --num-threads "$THREADS" \
        --kv-transfer-config "$config" >"$LOG_DIR/$1.log" 2>&1 &
    pids+=($!)
}

echo "starting a prefill and a decode worker (logs in $LOG_DIR)..."
start_worker prefill $((PORT + 1)) kv_producer
start_worker decode $((PORT + 2)) kv_consumer
wait_healthy "http://127.0.0.1:$((PORT + 1))" prefill "${pids[0]}"
wait_healthy "http://127.0.0.1:$((PORT + 2))" decode "${pids[1]}"

$SLUICE router --host 127.0.0.1 --port "$PORT" --router-mode least-load \
    --prefill "http://127.0.0.1:$((PORT + 1))" --decode "http://127.0.0.1:$((PORT + 2))" \
    >"$LOG_DIR/router.log" 2>&1 &
pids+=($!)
wait_healthy "http://127.0.0.1:$PORT" router "${pids[2]}"

cat <<MSG

router (disaggregated) on http://127.0.0.1:$PORT: prefill :$((PORT + 1)), decode :$((PORT + 2)); try:

  curl http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The library opens at", "max_tokens": 32, "stream": true}'

  curl -s http://127.0.0.1:$PORT/metrics | grep -E 'disagg|kv_transfer'   # transfers, bytes, latency

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true   # until Ctrl-C, or one of them exits; the EXIT trap stops the rest
