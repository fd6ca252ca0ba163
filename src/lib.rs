//! struere-proxy: a PostgreSQL wire-protocol proxy that makes one shared database safe for many
//! tenants, two environments and many roles.
//!
//! # Layout
//! - [`protocol`]: pure wire protocol — strict framing, startup packets, messages, SQLSTATEs.
//! - [`rewrite`]: pure statement pipeline — split and classify (pg_query), parse (sqlparser),
//!   policy hook, guess-free printer, verification (pg_query).
//! - [`auth`]: API keys — generation, SHA-256 hashing, the key store and its TTL cache, throttling,
//!   and the caller identity ([`auth::identity::ActorContext`]).
//! - [`session`]: one client connection — handshake, relay, refusals kept in protocol step.
//! - [`upstream`]: the raw connection to the real database and cancel requests.
//! - [`pool`]: session pooling of upstream connections (reset with `DISCARD ALL` between clients).
//! - [`metrics`], [`admin`]: counters and histograms, and the admin HTTP endpoint (`/metrics`,
//!   `/healthz`, `/readyz`, the operator dashboard, `/reload`); [`reports`]: events and usage read
//!   back; [`logging`]: text/JSON logs with a reloadable filter.
//! - [`server`]: the listener and the state sessions share; [`cancel`]: cancel-key mapping.
//! - [`config`], [`cli`], [`app`], [`demo`]: configuration layers and the subcommands.
//! - [`doctor`]: schema and upstream-role checks (also consulted by the server before it lets
//!   production keys in); [`migrate`]: `migrate add-environment`.
//! - [`lifecycle`]: the policy lifecycle (`policy dev`, `deploy`, `status`, `history`, `rollback`)
//!   over the deployed bundles of [`policy::store`].
//! - [`cluster`]: a throwaway local PostgreSQL for the demo and the tests.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cancel;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod events;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod net;
pub mod policy;
pub mod pool;
pub mod protocol;
pub mod reports;
pub mod rewrite;
pub mod server;
pub mod session;
pub mod upstream;

/// The hasher of the maps the statement path keys by text: the rewrite cache (whole statements
/// and their shapes' keys, up to 64 KiB each), each upstream connection's named statements (by
/// rewritten text) and the event writer's aggregation (by caller and statement). SipHash, std's
/// default, was a sixth of a pgbench `-M simple` transaction in the relay; foldhash costs a
/// fraction of that. Its seed is drawn per process and no hash leaves it; a client that still
/// made its texts collide would lengthen one bucket of a bounded map.
pub(crate) type TextHasher = foldhash::fast::RandomState;
