#!/usr/bin/env bash
# Makes sure the local brokers the tests use answer on loopback: RabbitMQ on 5672 and
# Redis on 6379. Starts an installed one that is down; fails loudly if it stays down.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure() {
  local name=$1 port=$2
  shift 2
  if listening "$port"; then
    return 0
  fi
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "$name is not running on 127.0.0.1:$port and '$1' is not installed" >&2
    exit 1
  fi
  echo "starting $name on 127.0.0.1:$port"
  "$@" </dev/null >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    if listening "$port"; then
      return 0
    fi
    sleep 1
  done
  echo "$name did not come up on 127.0.0.1:$port within 60 s" >&2
  exit 1
}

ensure RabbitMQ 5672 rabbitmq-server -detached
ensure Redis 6379 redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save ""
