//! The conformance suite against the local Redis, through ferry's Redis Streams backend
//! (`type = "redis"`).

ferry_e2e::conformance_suite!(ferry_e2e::conformance::redis::Redis::connect().await);
