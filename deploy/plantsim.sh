#!/usr/bin/env bash
# Plant load test on one machine: a throwaway PostgreSQL cluster and Mosquitto broker on 127.0.0.1, then
# `station plantsim` (20 simulated stations × 60 verdicts/s into one recorder and one MQTT bridge).
# Usage: [NO_MQTT=1] deploy/plantsim.sh [plantsim options, e.g. --count 1800 --stations 20 --rate 60]
# Needs Debian's postgresql and mosquitto (deploy/test.sh installs both) and .venv with station[bridges].
set -euo pipefail
cd "$(dirname "$0")/.."
bindir=$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")")
work=$(mktemp -d /tmp/station-plantsim-XXXXXX)
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres: "$work"; as_pg=(runuser -u postgres --); fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(port); mq_port=$(port)
cleanup() {
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  [ -n "${mq_pid:-}" ] && kill "$mq_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"${as_pg[@]}" "$bindir/initdb" -D "$work/data" -A trust -U postgres -E UTF8 --no-sync >/dev/null
# Durable settings (fsync on): the figures are for a recorder a plant would run.
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start \
  -o "-p $pg_port -k $work -c listen_addresses=127.0.0.1" >/dev/null
# Mosquitto queues at most 1000 QoS 1 messages per subscriber by default; the counting subscriber needs more.
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' \
  "$mq_port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mq_pid=$!
sleep 0.5
# NO_MQTT=1: the recorder alone
broker=(--broker "mqtt://127.0.0.1:$mq_port"); [ -n "${NO_MQTT:-}" ] && broker=()
.venv/bin/station plantsim --db "postgresql://postgres@127.0.0.1:$pg_port/postgres" "${broker[@]}" "$@"
