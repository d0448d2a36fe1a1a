//! ferryd, the host agent: it owns the VMs on this host, each its own
//! `ferry run` process, keeps their records in an embedded database, and
//! serves an HTTP/JSON API on a Unix socket and, over mutual TLS 1.3, to
//! its peers; it migrates VMs to other agents as jobs ([`migration`]).
//!
//! # Process model
//! Every VM is a detached `ferry run --api SOCKET` in its own session, its
//! console going to a log file under the state directory. The agent
//! supervises it through a pidfd and answers for it, but never owns its
//! life: killing the agent (even with -9) leaves every VM running, and the
//! next agent re-adopts each one after checking its pid, the start time
//! the kernel recorded for that pid, and that its API socket answers.
//!
//! # Why redb
//! The records live in one redb file: pure Rust (no C library to build
//! or link, which matters for a static, self-contained `ferryd`), ACID
//! write transactions with a durable commit, and a single-writer file lock
//! that refuses a second agent on the same state directory. The records
//! are a handful of key/value rows read by id; SQLite's query language
//! would buy nothing here and cost a C build.

pub mod api;
pub mod client;
pub mod config;
pub mod durable;
pub mod events;
pub mod fleet_figures;
pub mod fleet_jobs;
pub mod fleet_member;
pub mod fleet_migrator;
pub mod incoming;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod migration;
pub mod model;
pub mod network;
pub mod peer;
pub mod procs;
pub mod retention;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod tap_gc;
pub mod time;
pub mod tune;
