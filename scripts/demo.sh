#!/usr/bin/env bash
# The demo of the documented flow, on a local SQS/SNS emulator:
#   SNS topic orders-topic -> SQS queue orders-consumer -> ferry -> examples/target
# Creates the topic, queue and subscription, starts the example endpoint and ferry,
# publishes five orders and shows them arriving.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/moto.sh
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"

echo "building ferry and the example endpoint (release)..."
cargo build --release --quiet -p ferry-bin -p ferry-example-target

WORK="$(mktemp -d)"
PIDS=()
cleanup() { # SIGTERM every background process still running, wait for it, drop the logs
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

aws() { # the steps the original service documented with awslocal, through boto3
  python3 - "$@" <<'PY'
import sys, boto3
kw = dict(endpoint_url="http://127.0.0.1:4566", region_name="us-east-1")
sns, sqs = boto3.client("sns", **kw), boto3.client("sqs", **kw)
if sys.argv[1] == "setup":
    topic = sns.create_topic(Name="orders-topic")["TopicArn"]
    queue = sqs.create_queue(QueueName="orders-consumer")["QueueUrl"]
    sqs.create_queue(QueueName="orders-consumer-dlq")
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    print(f"topic {topic}\nqueue {queue} subscribed")
else:
    topic = sns.create_topic(Name="orders-topic")["TopicArn"]
    for n in range(1, 6):
        sns.publish(TopicArn=topic, Message='{"order_id": %d, "item": "book"}' % n,
                    MessageAttributes={"tenant": {"DataType": "String", "StringValue": "demo"}})
    print("published 5 orders to orders-topic")
PY
}

aws setup
target/release/example-target --listen 127.0.0.1:4000 >"$WORK/target.log" 2>&1 &
PIDS+=($!)
target/release/ferry run --config examples/local.toml 2>"$WORK/ferry.log" &
FERRY_PID=$!
PIDS+=("$FERRY_PID")

for _ in $(seq 1 50); do
  curl -s -o /dev/null --max-time 1 http://127.0.0.1:8080/readyz && break
  sleep 0.2
done
aws publish

for _ in $(seq 1 100); do
  [ "$(grep -c ' id=' "$WORK/target.log" || true)" -ge 5 ] && break
  sleep 0.2
done
echo
echo "--- what the endpoint received ---"
cat "$WORK/target.log"
echo "--- ferry's metrics (delivered) ---"
curl -s http://127.0.0.1:8080/metrics | grep '^ferry_deliveries_total' || true
if [ "$(grep -c ' id=' "$WORK/target.log" || true)" -lt 5 ]; then
  echo "not every order arrived; ferry's log:" >&2
  cat "$WORK/ferry.log" >&2
  exit 1
fi

echo
echo "stopping ferry (SIGTERM: finishes in-flight deliveries) and the endpoint..."
kill -TERM "$FERRY_PID" 2>/dev/null || true
wait "$FERRY_PID" 2>/dev/null || true
cleanup
trap - EXIT

cat <<'MSG'

Run it yourself (the emulator keeps running; scripts/moto.sh starts it if needed):
  target/release/example-target --listen 127.0.0.1:4000 &     # prints what it receives
  target/release/ferry run --config examples/local.toml        # ctrl-c or SIGTERM to stop
and publish to orders-topic on http://127.0.0.1:4566 (e.g. awslocal sns publish ...).
Options of the endpoint: --latency-ms, --fail-rate, --fail-every, --status.
MSG
