//! Wire formats, and nothing else: decoding what a socket received into typed messages and
//! encoding what the server sends. No I/O, no session state.
//!
//! - [`wire`]: the y-websocket binary protocol of the whiteboard endpoint (lib0 encoding,
//!   built on `yrs::sync`).
//! - [`tutor`]: the JSON messages of the tutor endpoint.

pub mod tutor;
pub mod wire;
