//! The fleet's identities: a private CA, host certificates, mutually authenticated TLS 1.3, and the peer's identity.
