//! The PostgreSQL wire protocol, without I/O: strict framing, startup packets, the few frontend
//! messages the proxy must look inside, and the backend messages the proxy itself emits.
//!
//! Everything here is a pure function over bytes, so it is unit-tested and fuzzed without a socket.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod sqlstate;
pub mod startup;
