//! One integration binary (like ripgrep's `tests/tests.rs`): a real PostgreSQL cluster started
//! once for the whole binary, the proxy in front of it, and real clients (tokio-postgres, psql,
//! raw sockets) talking to it.

mod admin;
mod attacks;
mod auth;
mod catalog;
mod cli;
mod compat;
mod dashboard;
mod differential;
mod doctor;
mod drain;
mod events;
mod harness;
mod hostile;
mod isolation;
mod lifecycle;
mod limits;
mod plans;
mod pool;
mod prepared;
mod psql;
mod suites;
mod wire;
mod writes;
