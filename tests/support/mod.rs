//! Helpers for the black-box integration tests (`tests/it/`), split by concern.
//!
//! Every test spawns the real `easel` binary on 127.0.0.1:0 with a temporary data
//! directory and a temporary TOML config, and talks to it over real sockets only.
//! Nothing from the easel library crate is used here (a few tests in `tests/it/` call
//! library functions directly; those import them themselves).
//!
//! Every item is re-exported flat, so a test module says `use crate::support::*;`.

mod cli;
mod codec;
mod doc;
mod files;
mod http;
mod redis_server;
mod server;
mod token;
mod tutor;
mod wait;
mod wb;
mod ws;

pub use cli::*;
pub use codec::*;
pub use doc::*;
pub use files::*;
pub use http::*;
pub use redis_server::*;
pub use server::*;
pub use token::*;
pub use tutor::*;
pub use wait::*;
pub use wb::*;
pub use ws::*;
