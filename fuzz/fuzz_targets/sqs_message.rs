//! Arbitrary bytes as an SQS message body (plus attributes after a NUL byte), through the
//! SQS source's decoding and the HTTP sink's encoders.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry_fuzz::sqs_message(data));
