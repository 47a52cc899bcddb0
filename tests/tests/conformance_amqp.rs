//! The conformance suite against the local RabbitMQ.

ferry_e2e::conformance_suite!(ferry_e2e::conformance::amqp::Amqp);
