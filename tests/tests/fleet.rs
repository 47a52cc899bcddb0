//! Three replicas on one queue or topic (see `ferry_e2e::fleet`): steady state, a
//! `kill -9`, a rolling restart and scaling 1 → 3 → 1, on every broker, counting ids.

use ferry_e2e::conformance::amqp::Amqp;
use ferry_e2e::conformance::kafka::Kafka;
use ferry_e2e::conformance::sqs::Sqs;
use ferry_e2e::faults;
use ferry_e2e::fleet::{self, Explained};

const RABBITMQ: Explained = Explained {
    per_thousand: 0,
    rebalances: false,
};
/// The emulator's own duplicates with several receivers: about 1 in 2,000 by its
/// authors' measure, up to 2 in 300 seen with three replicas of two receivers each (every
/// one labelled as a redelivery).
const SQS: Explained = Explained {
    per_thousand: 10,
    rebalances: false,
};
const KAFKA: Explained = Explained {
    per_thousand: 0,
    rebalances: true,
};

macro_rules! scenario {
    ($name:ident, $run:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            $run.await.assert_sound();
        }
    };
}

scenario!(
    steady_amqp,
    fleet::steady(&Amqp, "RabbitMQ", faults::size(), RABBITMQ)
);
scenario!(
    steady_sqs,
    fleet::steady(&Sqs::connect().await, "SQS", faults::sqs_size(), SQS)
);
scenario!(
    steady_kafka,
    fleet::steady(&Kafka, "Kafka", faults::size(), KAFKA)
);
scenario!(
    kill_amqp,
    fleet::kill_one(&Amqp, "RabbitMQ", faults::size(), RABBITMQ)
);
scenario!(
    kill_sqs,
    fleet::kill_one(&Sqs::connect().await, "SQS", faults::sqs_size(), SQS)
);
scenario!(
    kill_kafka,
    fleet::kill_one(&Kafka, "Kafka", faults::size(), KAFKA)
);
scenario!(
    rolling_amqp,
    fleet::rolling_restart(&Amqp, "RabbitMQ", faults::size(), RABBITMQ)
);
scenario!(
    rolling_sqs,
    fleet::rolling_restart(&Sqs::connect().await, "SQS", faults::sqs_size(), SQS)
);
scenario!(
    rolling_kafka,
    fleet::rolling_restart(&Kafka, "Kafka", faults::size(), KAFKA)
);
scenario!(
    scale_amqp,
    fleet::scale_1_3_1(&Amqp, "RabbitMQ", faults::size(), RABBITMQ)
);
scenario!(
    scale_sqs,
    fleet::scale_1_3_1(&Sqs::connect().await, "SQS", faults::sqs_size(), SQS)
);
scenario!(
    scale_kafka,
    fleet::scale_1_3_1(&Kafka, "Kafka", faults::size(), KAFKA)
);

/// While a replica drains after SIGTERM, `/readyz` answers 503 at once (a load balancer or
/// Kubernetes stops counting it), and the deliveries in flight still finish: all arrive once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_at_once_while_draining() {
    use std::time::{Duration, Instant};

    use ferry_e2e::amqp::Rabbit;
    use ferry_e2e::ferry::{amqp_source, Route};
    use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("draining").await;
    let sent = rabbit.publish_numbered(&queue.name, "drain", 5).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_secs(3))).await;
    let mut ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 10"),
        sink_url: &endpoint.url(),
        sink: "timeout = \"10s\"",
        delivery: "concurrency = 5",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let readyz = format!("http://127.0.0.1:{}/readyz", ferry.admin_port);
    let client = reqwest::Client::new();
    let status = |client: &reqwest::Client| {
        let url = readyz.clone();
        let client = client.clone();
        async move {
            client
                .get(&url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(status(&client).await, 200, "ready before the drain");
    assert!(wait_until(Duration::from_secs(10), || endpoint.open() == 5).await);
    ferry.signal("TERM");
    let signalled = Instant::now();
    let mut answered = 0;
    while signalled.elapsed() < Duration::from_millis(500) {
        answered = status(&client).await;
        if answered == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        answered,
        503,
        "/readyz while draining; log:\n{}",
        ferry.log()
    );
    assert!(
        ferry.wait_exit(Duration::from_millis(100)).await.is_none(),
        "ferry exited before its deliveries finished"
    );
    let exited = ferry.wait_exit(Duration::from_secs(15)).await;
    assert!(exited.is_some_and(|s| s.success()), "log:\n{}", ferry.log());
    assert_eq!(endpoint.delivered_set(), sent);
    assert_eq!(endpoint.seen().len(), 5, "each once");
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}
