//! The fault-injection suite (see `ferry_e2e::faults`): every scenario counts messages in
//! and out under its fault; lost must be 0 and duplicates explained. The CI runs it with a
//! small `FERRY_FAULTS_N`; `RELIABILITY.md` has a full run's table:
//! `FERRY_FAULTS_N=3000 FERRY_FAULTS_DOWN_SECS=30 cargo test -p ferry-e2e --test faults
//! -- --nocapture --test-threads 1`.

use ferry_e2e::conformance::amqp::Amqp;
use ferry_e2e::conformance::kafka::Kafka;
use ferry_e2e::conformance::sqs::Sqs;
use ferry_e2e::faults;
use tokio::sync::RwLock;

/// The RabbitMQ restart takes the broker from every other scenario: it runs alone.
static BROKER: RwLock<()> = RwLock::const_new(());

macro_rules! scenario {
    ($name:ident, $run:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let _shared = BROKER.read().await;
            $run.await.assert_sound();
        }
    };
}

scenario!(
    kill_amqp,
    faults::kill_and_restart(&Amqp, "RabbitMQ", faults::size())
);
scenario!(
    kill_sqs,
    faults::kill_and_restart(&Sqs::connect().await, "SQS", faults::sqs_size())
);
scenario!(
    kill_kafka,
    faults::kill_and_restart(&Kafka, "Kafka", faults::size())
);
scenario!(
    outage_amqp,
    faults::broker_outage(&Amqp, "RabbitMQ", faults::size())
);
scenario!(
    outage_kafka,
    faults::broker_outage(&Kafka, "Kafka", faults::size())
);
scenario!(
    down_amqp,
    faults::endpoint_down(&Amqp, "RabbitMQ", faults::size())
);
scenario!(
    down_sqs,
    faults::endpoint_down(&Sqs::connect().await, "SQS", faults::sqs_size())
);
scenario!(
    down_kafka,
    faults::endpoint_down(&Kafka, "Kafka", faults::size())
);
scenario!(
    errors_amqp,
    faults::endpoint_errors(&Amqp, "RabbitMQ", faults::size())
);
scenario!(
    errors_sqs,
    faults::endpoint_errors(&Sqs::connect().await, "SQS", faults::sqs_size())
);
scenario!(
    errors_kafka,
    faults::endpoint_errors(&Kafka, "Kafka", faults::size())
);
scenario!(
    cuts_amqp,
    faults::endpoint_cuts_connections(&Amqp, "RabbitMQ", faults::size())
);
scenario!(
    cuts_sqs,
    faults::endpoint_cuts_connections(&Sqs::connect().await, "SQS", faults::sqs_size())
);
scenario!(
    cuts_kafka,
    faults::endpoint_cuts_connections(&Kafka, "Kafka", faults::size())
);
scenario!(slow_sqs, faults::slow_endpoint_sqs());
scenario!(poison_amqp, faults::poison_input());
scenario!(
    sigterm_open_circuit_amqp,
    faults::sigterm_while_circuit_open()
);
scenario!(sigterm_amqp, faults::sigterm_with_in_flight(1000));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart() {
    let _alone = BROKER.write().await;
    faults::rabbitmq_restart().await.assert_sound();
}
