//! easel-bench's shared code: the whiteboard workload that both the load generator
//! (`src/bin/easel-loadgen/`) and the criterion benches (`benches/hot_path.rs`) drive, and
//! the accept loop and WebSocket pieces of the bench's own client and servers (`listen`,
//! `wire`), and the split of the machine's CPUs between a server and the load generator
//! (`pin`).
//!
//! Knows nothing of the server's code: the load generator reaches easel only over
//! sockets, so this library depends on `yrs`, `rand`, `tokio`, `sha1`, `base64`, `libc`,
//! `memchr` and the standard library.

pub mod listen;
pub mod pin;
pub mod wire;
pub mod workload;
