//! The conformance suite against the local Mosquitto, through ferry's MQTT 5 backend
//! (`type = "mqtt"`).

ferry_e2e::conformance_suite!(ferry_e2e::conformance::mqtt::Mqtt::connect().await);
