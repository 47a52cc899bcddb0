//! The conformance suite against the local NATS server, through ferry's JetStream backend
//! (`type = "nats"`).

ferry_e2e::conformance_suite!(ferry_e2e::conformance::nats::Nats::connect().await);
