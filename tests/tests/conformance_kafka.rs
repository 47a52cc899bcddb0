//! The conformance suite against Kafka (librdkafka's mock cluster, real protocol).

ferry_e2e::conformance_suite!(ferry_e2e::conformance::kafka::Kafka);
