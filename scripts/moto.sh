#!/usr/bin/env bash
# Makes sure the local SQS/SNS emulator (moto) answers on 127.0.0.1:4566:
# installs it from PyPI if needed and starts it in the background. Safe to run twice.
set -euo pipefail

ADDR=127.0.0.1
PORT=4566
URL="http://$ADDR:$PORT/moto-api/"
LOG="${TMPDIR:-/tmp}/ferry-moto.log"

up() { curl -s -o /dev/null --max-time 2 "$URL"; }

if up; then
  exit 0
fi
if ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
  echo "installing moto[server] from PyPI..."
  python3 -m pip install --quiet 'moto[server]' </dev/null
fi
echo "starting the SQS/SNS emulator on $ADDR:$PORT (log: $LOG)"
nohup python3 -m moto.server -H "$ADDR" -p "$PORT" >"$LOG" 2>&1 </dev/null &
for _ in $(seq 1 60); do
  if up; then
    exit 0
  fi
  sleep 0.5
done
echo "the SQS/SNS emulator did not start on $ADDR:$PORT; see $LOG" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
