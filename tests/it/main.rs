//! The one integration-test binary: every test runs the real `easel` binary (spawned by
//! `support::TestServer` or the CLI helpers) and talks to it over real sockets.
//!
//! One binary, not one per file, so the helpers in `tests/support/` compile and link once
//! and a server change relinks a single test executable. The tests share this process and
//! run in parallel (cargo's default thread count), so a test must not change process-wide
//! state (environment variables, the working directory) and must not assume a fixed port:
//! every server listens on 127.0.0.1:0 with its own temporary data directory.
//!
//! Run one area with `cargo test --test it whiteboard::`, one test by its full name.

#[path = "../support/mod.rs"]
mod support;

mod auth;
mod awareness;
mod chat_lane;
mod chat_moderation;
mod cli;
mod cluster;
mod first_hour;
mod fixtures_replay;
mod hostile_corpus;
mod hostile_doc;
mod hostile_http;
mod hostile_ws;
mod http_fallback;
mod join;
mod lifecycle;
mod limits;
mod persistence;
mod redis_store;
mod storage_faults;
mod tutor;
mod whiteboard;
mod ws_deflate;
