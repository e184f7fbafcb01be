//! Pure `yrs` work that belongs to no session: checking bytes before `yrs` decodes them.
//!
//! Nothing here does I/O, holds a lock or knows about connections; every function takes
//! bytes (or a document) and returns a value. The session layer calls in; this module
//! never calls out.
//!
//! - [`guard`]: the update guard of SPEC.md 7.1, in front of every decode of bytes that a
//!   client, a file or the store sent (updates, state vectors, awareness).

pub mod guard;
