//! Sockets at the edge: the client stream (plain or TLS) and TLS material.

pub mod stream;
pub mod tls;
