#!/usr/bin/env bash
# Builds ferry's image from a binary built outside and runs it against the local RabbitMQ:
# ferry starts as non-root in the container, delivers from a queue to an endpoint on
# loopback (host network), and `podman stop` (SIGTERM) drains with nothing lost; a second
# container then delivers the rest. Needs podman (as root, with runc), debootstrap for the
# base image (scripts/container-base.sh) and RabbitMQ on 127.0.0.1:5672 (guest/guest).
#   FERRY_BINARY=target/release/ferry scripts/container-smoke.sh
# The binary must include the amqp feature (default: target/release/ferry, else target/debug/ferry).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/debian-slim:bookworm
IMAGE=localhost/ferry:smoke
QUEUE=ferry-container-smoke
# runc sets the limits it is given (podman's defaults are above what it may): open files as
# this shell has them, and processes well below its limit.
NOFILE="$(ulimit -Sn):$(ulimit -Hn)"
NPROC=4096:4096
TOTAL="${SMOKE_MESSAGES:-200}"
PORT="${SMOKE_PORT:-18931}"
ADMIN_PORT="${SMOKE_ADMIN_PORT:-18932}"
BINARY="${FERRY_BINARY:-}"
if [ -z "$BINARY" ]; then
  for b in target/release/ferry target/debug/ferry; do [ -x "$b" ] && { BINARY="$b"; break; }; done
fi
[ -x "$BINARY" ] || { echo "container-smoke: no ferry binary (build it, or set FERRY_BINARY)" >&2; exit 2; }
python3 -c 'import pika' 2>/dev/null || python3 -m pip install -q pika

WORK="$(mktemp -d)"
CTRS=()
ENDPOINT_PID=""
DANGLING_BEFORE=""
BUILT=0
cleanup() {
  for c in ${CTRS[@]+"${CTRS[@]}"}; do podman rm -f -t 0 "$c" >/dev/null 2>&1 || true; done
  [ -n "$ENDPOINT_PID" ] && kill "$ENDPOINT_PID" 2>/dev/null || true
  # The image (some 440 MB with a debug binary) and the stage images this build left.
  [ "$BUILT" = 1 ] || { rm -rf "$WORK" dist/ferry; return; }
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  for id in $(podman images -q --filter dangling=true); do
    grep -qx "$id" <<<"$DANGLING_BEFORE" || podman rmi "$id" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK" dist/ferry
}
trap cleanup EXIT

scripts/container-base.sh "$BASE"
DANGLING_BEFORE="$(podman images -q --filter dangling=true)"
BUILT=1
mkdir -p dist
ln -f "$BINARY" dist/ferry 2>/dev/null || cp "$BINARY" dist/ferry
echo "building $IMAGE from $BINARY"
podman build -q --runtime runc --ulimit "nofile=$NOFILE" --ulimit "nproc=$NPROC" \
  --build-arg FERRY_SOURCE=prebuilt --build-arg FERRY_BINARY=dist/ferry \
  --build-arg RUNTIME_IMAGE="$BASE" -t "$IMAGE" . >/dev/null

# The endpoint: records each body (the message number), answers 200 after 50 ms so that
# requests are in flight when the container is stopped.
cat >"$WORK/endpoint.py" <<'PY'
import sys, time, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
out = open(sys.argv[2], "a", buffering=1)
lock = threading.Lock()
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        time.sleep(0.05)
        with lock:
            out.write(body + "\n")
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$WORK/endpoint.py" "$PORT" "$WORK/received" &
ENDPOINT_PID=$!

amqp() { # purge | publish N | count
  python3 - "$QUEUE" "$@" <<'PY'
import sys, pika
queue, op = sys.argv[1], sys.argv[2]
conn = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
ch = conn.channel()
q = ch.queue_declare(queue=queue, durable=True)
if op == "purge":
    ch.queue_purge(queue)
elif op == "publish":
    for n in range(int(sys.argv[3])):
        ch.basic_publish("", queue, f"m-{n}", pika.BasicProperties(delivery_mode=2, message_id=f"m-{n}"))
else:
    print(q.method.message_count)
conn.close()
PY
}

cat >"$WORK/config.toml" <<EOF2
[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[routes.smoke.source]
type = "amqp"
uri = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "$QUEUE"
prefetch = 20
dead_letters = "drop"

[routes.smoke.sink]
type = "http"
url = "http://127.0.0.1:$PORT/consume"
mode = "raw"

[routes.smoke.delivery]
concurrency = 4
shutdown_grace = "20s"
EOF2
chmod 0644 "$WORK/config.toml"; chmod 0755 "$WORK"

start_ferry() { # name [podman run options -- ferry arguments]: the image's user, its CMD by default
  local name="$1"; shift
  local opts=() args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ $# -gt 0 ] && { shift; args=("$@"); }
  CTRS+=("$name")
  podman run -d --name "$name" --runtime runc --network host --ulimit "nofile=$NOFILE" --ulimit "nproc=$NPROC" \
    -v "$WORK/config.toml:/etc/ferry/config.toml:ro" ${opts[@]+"${opts[@]}"} "$IMAGE" ${args[@]+"${args[@]}"} >/dev/null
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && return 0
    sleep 0.2
  done
  podman logs "$name" >&2; echo "container-smoke: ferry in $name never became ready" >&2; exit 1
}
received() { [ -f "$WORK/received" ] && wc -l <"$WORK/received" || echo 0; }

amqp purge
: >"$WORK/received"
amqp publish "$TOTAL"
start_ferry ferry-smoke-1
uid="$(podman exec ferry-smoke-1 id -u)"
pid="$(podman inspect -f '{{.State.Pid}}' ferry-smoke-1)"
puid="$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")"
echo "ferry runs in the container as uid $uid (host view of its process: uid $puid)"
[ "$uid" != 0 ] && [ "$puid" != 0 ] || { echo "container-smoke: ferry runs as root" >&2; exit 1; }

# Stop mid-stream, with requests in flight.
for _ in $(seq 200); do [ "$(received)" -ge $((TOTAL / 4)) ] && break; sleep 0.05; done
before="$(received)"
start=$(date +%s%N)
podman stop -t 30 ferry-smoke-1 >/dev/null
took_ms=$(( ($(date +%s%N) - start) / 1000000 ))
code="$(podman inspect -f '{{.State.ExitCode}}' ferry-smoke-1)"
at_stop="$(received)"
left="$(amqp count)"
echo "stop: SIGTERM with $before delivered; exited $code after ${took_ms} ms; delivered $at_stop, $left back in the queue"
[ "$code" = 0 ] || { podman logs ferry-smoke-1 >&2; echo "container-smoke: ferry exited $code on SIGTERM" >&2; exit 1; }
# A clean stop delivers what ferry held and gives back the rest: nothing lost, nothing twice.
[ $((at_stop + left)) -eq "$TOTAL" ] \
  || { echo "container-smoke: after the stop $at_stop delivered + $left queued != $TOTAL sent" >&2; exit 1; }

# A second container delivers the rest, locked down as the Helm chart runs it: read-only
# root, writable working directory and /tmp only, no capabilities, no privilege gain.
start_ferry ferry-smoke-2 --read-only --tmpfs /var/lib/ferry --tmpfs /tmp --cap-drop ALL \
  --security-opt no-new-privileges -- run --config-dir /etc/ferry --log-format json
for _ in $(seq 600); do [ "$(received)" -ge "$TOTAL" ] && break; sleep 0.1; done
sleep 1
podman stop -t 30 ferry-smoke-2 >/dev/null
code="$(podman inspect -f '{{.State.ExitCode}}' ferry-smoke-2)"
[ "$code" = 0 ] || { podman logs ferry-smoke-2 >&2; echo "container-smoke: ferry exited $code on SIGTERM" >&2; exit 1; }
sent="$TOTAL"
delivered="$(received)"
unique="$(sort -u "$WORK/received" | wc -l)"
lost=$((sent - unique))
echo "sent $sent, delivered $delivered, unique $unique, duplicates $((delivered - unique)), lost $lost, in the queue $(amqp count)"
if [ "$lost" -ne 0 ] || [ "$delivered" -ne "$unique" ]; then
  echo "container-smoke: FAILED" >&2; exit 1
fi
echo "container-smoke: ok"
