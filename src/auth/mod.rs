//! API keys: generating and hashing them, the key store in the upstream database with its TTL
//! cache, and the throttle that slows failed attempts.
//!
//! Invariant: authentication failures are indistinguishable to the client (unknown, revoked, expired: the same 28P01)
//! and are slowed; successes never are.

pub mod api_key;
pub mod identity;
pub mod store;
pub mod throttle;
