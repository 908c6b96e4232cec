# Sourced by examples/agg.sh and examples/disagg.sh: the processes they start (PIDs in `pids`),
# stopped together on Ctrl-C or exit, and a wait for one of them to answer /health.
# Needs LOG_DIR; each process logs to $LOG_DIR/NAME.log.

pids=()
stop() {
    trap - INT TERM EXIT
    echo "stopping router and workers (logs in $LOG_DIR)..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop INT TERM EXIT

wait_healthy() {   # URL NAME PID: wait up to 300 s for URL/health; exit 1 if NAME dies first
    for _ in $(seq 1 600); do
        if ! kill -0 "$3" 2>/dev/null; then
            echo "$2 exited; see $LOG_DIR/$2.log" >&2
            tail -n 20 "$LOG_DIR/$2.log" >&2
            exit 1
        fi
        if curl -fs -o /dev/null "$1/health"; then return 0; fi
        sleep 0.5
    done
    echo "$2 not healthy after 300 s; see $LOG_DIR/$2.log" >&2
    exit 1
}
