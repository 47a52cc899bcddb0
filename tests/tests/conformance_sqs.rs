//! The conformance suite against SQS on the local emulator.

ferry_e2e::conformance_suite!(ferry_e2e::conformance::sqs::Sqs::connect().await);
