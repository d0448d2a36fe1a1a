//! Benchmarks that compare Ferry with QEMU's own live migration on this
//! machine.

pub mod qemu;
pub mod qmp;
