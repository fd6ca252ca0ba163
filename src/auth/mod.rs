//! API keys: generating and hashing them, the key store in the upstream database with its TTL
//! cache, and the throttle that slows failed attempts.

pub mod api_key;
pub mod identity;
pub mod store;
pub mod throttle;
