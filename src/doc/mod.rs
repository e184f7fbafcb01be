//! Pure `yrs` work that belongs to no session: checking bytes before `yrs` decodes them,
//! restoring a document's content to a snapshot's, and the JSON view of a document.
//!
//! Nothing here does I/O, holds a lock or knows about connections; every function takes
//! bytes (or a document) and returns a value. The session layer calls in; this module
//! never calls out.
//!
//! - [`guard`]: the update guard of SPEC.md 7.1, in front of every decode of bytes that a
//!   client, a file or the store sent (updates, state vectors, awareness).
//! - [`restore`]: a forward edit that brings a document back to a snapshot's content
//!   (SPEC 5.3); the session applies it to its live document and relays the update.
//! - [`json`]: [`json::doc_to_json`], the document's content as JSON.
//! - [`roots`]: what a root type is, read from its content (relays never type roots).

pub mod guard;
pub mod json;
pub mod restore;
pub mod roots;
