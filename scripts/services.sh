#!/usr/bin/env bash
# Makes sure the local brokers the tests use answer on loopback: RabbitMQ on 5672, Redis
# on 6379, PostgreSQL on 5432, Mosquitto on 1883 and NATS (JetStream) on 4222. Starts one
# that is down, installing its Debian package first when it is missing and this runs as
# root; fails loudly if it stays down.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Installs a Debian package when running as root with apt (a fresh CI machine or
# container); anywhere else says exactly what to install.
install_package() {
  local package=$1 program=$2
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $package (for $program)..."
    if [ -z "${FERRY_APT_UPDATED:-}" ]; then
      apt-get update -qq </dev/null
      export FERRY_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" </dev/null >/dev/null
  else
    echo "'$program' is not installed: install the $package package (apt-get install $package), or run this as root to let it do so" >&2
    exit 1
  fi
}

ensure() {
  local name=$1 port=$2 package=$3
  shift 3
  if listening "$port"; then
    return 0
  fi
  if ! command -v "$1" >/dev/null 2>&1; then
    install_package "$package" "$1"
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

ensure RabbitMQ 5672 rabbitmq-server rabbitmq-server -detached
ensure Mosquitto 1883 mosquitto mosquitto -d -p 1883   # -p alone: loopback only, anonymous
ensure Redis 6379 redis-server redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save ""
# nats-server stays in the foreground: `setsid -f` puts it in the background, so its
# package is made sure of here rather than by `ensure` (which looks for the first word).
command -v nats-server >/dev/null 2>&1 || install_package nats-server nats-server
ensure NATS 4222 nats-server setsid -f nats-server -js -a 127.0.0.1 -p 4222 -sd "${TMPDIR:-/tmp}/ferry-nats-store"
ensure PostgreSQL 5432 postgresql pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 | grep . || echo 15)" main start
