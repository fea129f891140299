//! The integration tests' helpers (`tests/common/`), shared with the benchmarks: the agent binary as
//! a child process, the private libvirt session daemons, the OTLP receiver, the collector and
//! Prometheus pipeline. Every benchmark target that needs them declares `mod common;`, which is this
//! file: the one place where the benchmarks include `tests/common/`.

#[path = "../tests/common/mod.rs"]
mod tests_common;

pub use tests_common::*;
