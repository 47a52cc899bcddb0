//! Arbitrary bytes as a YAML configuration, through `ferry validate`'s path.
#![no_main]

use ferry_bin::config::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ferry_fuzz::config(data, Format::Yaml));
