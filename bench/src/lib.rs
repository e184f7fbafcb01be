//! easel-bench's shared code: the whiteboard workload that both the load generator
//! (`src/bin/easel-loadgen/`) and the criterion benches (`benches/hot_path.rs`) drive, and
//! the accept loop of the bench's own servers (`listen`).
//!
//! Knows nothing of the server's code: the load generator reaches easel only over
//! sockets, so this library depends on `yrs`, `rand`, `tokio` and the standard library.

pub mod listen;
pub mod workload;
