//! easel: a CRDT document-sync relay for live tutoring sessions.
//!
//! Data flows one way: socket ([`socket`]) → protocol decode ([`protocol`]) → session
//! ([`session`]) → store ([`store`]) and fan-out ([`outbox`]) → sockets. [`server`] wires
//! the HTTP routes and upgrades; [`config`], [`auth`], [`limits`] and [`metrics`] are the
//! cross-cutting pieces each of those takes what it needs from.

pub mod admin;
pub mod auth;
pub mod config;
pub mod demo;
pub mod doc;
pub mod http_api;
pub mod http_moderation;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod refusal_log;
pub mod server;
pub mod session;
pub mod socket;
pub mod store;
