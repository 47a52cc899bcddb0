//! The conformance suite against the local Redis, through the backend written outside
//! ferry in `examples/custom_backend`.

ferry_e2e::conformance_suite!(ferry_e2e::conformance::redis::Example::connect().await);
