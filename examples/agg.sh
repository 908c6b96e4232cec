#!/usr/bin/env bash
# Aggregated serving on one machine: a KV-aware `sluice router` in front of two `sluice serve`
# workers, each publishing its KV-cache events so the router can send a prompt to the worker that
# already holds its prefix.
#
#   examples/agg.sh                 # router on :8000, workers on :8001 and :8002
#   PORT=9000 examples/agg.sh       # router on :9000, workers on :9001 and :9002
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct ROUTER_MODE=least-load examples/agg.sh
#
# Ctrl-C stops the router and both workers. Logs: $LOG_DIR (default a temporary directory).
#
# On several hosts: run each worker with --host 0.0.0.0 and its --kv-events-config endpoint
# "tcp://*:PORT" (bound on every interface), and give the router
# --worker http://WORKER_HOST:HTTP_PORT,tcp://WORKER_HOST:EVENTS_PORT,tcp://WORKER_HOST:REPLAY_PORT
# (or register workers later: curl -X POST ROUTER/workers -d '{"url": ..., "kv_events_endpoint": ...}').
set -euo pipefail

PORT="${PORT:-8000}"
MODEL="${MODEL:-}"                      # empty: the built-in demo model
ROUTER_MODE="${ROUTER_MODE:-kv}"        # kv | least-load | round-robin
EVENTS_PORT="${EVENTS_PORT:-5557}"      # worker i publishes on EVENTS_PORT+10*i, replays on +1
SLUICE="${SLUICE:-sluice}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t sluice-agg.XXXXXX)}"
THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))   # the two workers share the cores

# shellcheck source=examples/_processes.sh
source "$(dirname "${BASH_SOURCE[0]}")/_processes.sh"   # pids, stop (on exit), wait_healthy

worker_specs=()
for i in 1 2; do
    http_port=$((PORT + i))
    events=$((EVENTS_PORT + 10 * (i - 1)))
    replay=$((events + 1))
    kv_events="{\"enable_kv_cache_events\": true, \"publisher\": \"zmq\", \"endpoint\": \"tcp://*:$events\", \"replay_endpoint\": \"tcp://*:$replay\"}"
    # shellcheck disable=SC2086  # MODEL is empty or one word
    $SLUICE serve $MODEL --host 127.0.0.1 --port "$http_port" --num-threads "$THREADS" \
        --kv-events-config "$kv_events" >"$LOG_DIR/worker$i.log" 2>&1 &
    pids+=($!)
    worker_specs+=(--worker "http://127.0.0.1:$http_port,tcp://127.0.0.1:$events,tcp://127.0.0.1:$replay")
done
echo "starting 2 workers (logs in $LOG_DIR)..."
wait_healthy "http://127.0.0.1:$((PORT + 1))" worker1 "${pids[0]}"
wait_healthy "http://127.0.0.1:$((PORT + 2))" worker2 "${pids[1]}"

$SLUICE router --host 127.0.0.1 --port "$PORT" --router-mode "$ROUTER_MODE" \
    "${worker_specs[@]}" >"$LOG_DIR/router.log" 2>&1 &
pids+=($!)
wait_healthy "http://127.0.0.1:$PORT" router "${pids[2]}"

cat <<MSG

router ($ROUTER_MODE) on http://127.0.0.1:$PORT over 2 workers; try:

  curl http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The library opens at", "max_tokens": 32}'

  curl http://127.0.0.1:$PORT/metrics | grep sluice_router_     # per-worker load, routing, KV hits

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true   # until Ctrl-C, or one of them exits; the EXIT trap stops the rest
