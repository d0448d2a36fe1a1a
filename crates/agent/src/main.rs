//! `ferryd --config host.toml`: the host agent.

fn main() {}
