//! Ferry's migration engine, independent of KVM; for now the wire protocol
//! both sides of a migration speak.
//!
//! Nothing here knows about KVM or guest memory mappings: the protocol moves
//! opaque descriptions, page batches and an opaque state record, so it can be
//! tested against plain buffers and in-process sockets.

pub mod error;
pub mod protocol;

pub use error::ProtocolError;
