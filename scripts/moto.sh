#!/usr/bin/env bash
# Makes sure the local SQS/SNS emulator (moto) answers on 127.0.0.1:4566:
# installs it from PyPI if needed and starts it in the background. Safe to run twice;
# does nothing if the emulator already answers. Needs no stdin.
set -euo pipefail

ADDR=127.0.0.1
PORT=4566
URL="http://$ADDR:$PORT/moto-api/"
LOG="${TMPDIR:-/tmp}/ferry-moto.log"

up() { curl -s -o /dev/null --max-time 2 "$URL"; }

SERVER="$(cd "$(dirname "$0")" && pwd)/moto_server.py"

if up; then
  # An emulator started some other way lacks the delete fix in moto_server.py.
  if pgrep -f "moto_server.py" >/dev/null; then
    exit 0
  fi
  echo "restarting the emulator on $ADDR:$PORT with the fix from scripts/moto_server.py"
  pkill -f "moto_server|moto.server" || true
  for _ in $(seq 1 20); do up || break; sleep 0.5; done
fi

if ! command -v curl >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing curl and python3..."
    apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl python3 python3-pip </dev/null >/dev/null
  else
    echo "the emulator needs curl and python3 with pip: install them (apt-get install curl python3 python3-pip)" >&2
    exit 1
  fi
fi

if ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
  echo "installing moto[server] from PyPI..."
  # A Debian system Python refuses installs outside a virtualenv unless told otherwise.
  python3 -m pip install --quiet 'moto[server]' </dev/null \
    || python3 -m pip install --quiet --break-system-packages 'moto[server]' </dev/null
fi

CMD=(python3 "$SERVER" -H "$ADDR" -p "$PORT")

echo "starting the SQS/SNS emulator on $ADDR:$PORT (log: $LOG)"
nohup "${CMD[@]}" >"$LOG" 2>&1 </dev/null &
PID=$!

# Wait up to 30 s (60 x 0.5 s) for it to answer.
for _ in $(seq 1 60); do
  if up; then
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "the SQS/SNS emulator exited during startup (is port $PORT taken?); see $LOG" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
  fi
  sleep 0.5
done
echo "the SQS/SNS emulator did not answer on $ADDR:$PORT within 30 s; see $LOG" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
