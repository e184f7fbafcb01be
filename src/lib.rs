//! easel: a CRDT document-sync relay for live tutoring sessions.
//!
//! Data flows one way: socket ([`ws`]) → protocol decode ([`protocol`]) → session
//! ([`session`]) → store ([`store`]) and fan-out (`session::peers`, [`ws::outbox`]) →
//! sockets. [`server`] wires the routes ([`http`], [`ws::upgrade`]) to the state they share
//! ([`app`]); [`config`], [`auth`], [`limits`] and [`metrics`] are the cross-cutting pieces
//! each of those takes what it needs from; [`sync`] recovers poisoned locks.

pub mod app;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod doc;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod refusal_log;
pub mod server;
pub mod session;
pub mod store;
pub mod sync;
pub mod ws;
