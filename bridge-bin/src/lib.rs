//! The parts of the `ferry` binary that other crates build on: the configuration loader,
//! so that fuzz targets (and tools that embed ferry) parse, interpolate and validate a
//! configuration exactly as `ferry validate` does. The binary compiles the same module
//! files as its own `mod config`.

pub mod config;
