//! Every WebSocket close code the server sends, in one place, and [`Close`], a close the
//! server decided on.
//!
//! Owns the numbers (RFC 6455 7.4 and the application's own 4401 and 4403) and the mapping from a
//! refused frame's [`WireError`] to its code. Must not touch sockets or sessions: the
//! writer in `ws` sends what is decided here.

use crate::protocol::wire::WireError;
use crate::store::StoreError;

pub const NORMAL: u16 = 1000;
pub const GOING_AWAY: u16 = 1001;
/// A frame that breaks RFC 6455 (or RFC 7692) framing rules.
pub const PROTOCOL_ERROR: u16 = 1002;
pub const UNSUPPORTED: u16 = 1003;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const POLICY: u16 = 1008;
pub const TOO_BIG: u16 = 1009;
pub const INTERNAL: u16 = 1011;
pub const RESTART: u16 = 1012;
pub const TRY_AGAIN_LATER: u16 = 1013;
pub const TOKEN_EXPIRED: u16 = 4401;
/// Removed from the session by a tutor or admin (SPEC 4.1).
pub const REMOVED: u16 = 4403;

/// A close the server decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

impl Close {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// The close for a frame the wire codec refused: undecodable bytes (or an awareness
    /// message past the guard's bounds) are an invalid payload, a type the protocol does
    /// not define is unsupported.
    pub fn for_wire(e: &WireError) -> Self {
        let code = match e {
            WireError::Malformed(_) | WireError::AwarenessRefused(_) => INVALID_PAYLOAD,
            WireError::Unsupported(_) => UNSUPPORTED,
        };
        Self::new(code, e.to_string())
    }

    /// The close for a connection whose send queue overflowed (SPEC 7: reconnect, resync).
    pub fn queue_full() -> Self {
        Self::new(TRY_AGAIN_LATER, "send queue full: reconnect and resync")
    }

    /// The close of a removed user's connections (SPEC 4.1).
    pub fn removed() -> Self {
        Self::new(REMOVED, "removed from the session")
    }

    /// The close for a write the store did not take (SPEC 5.4 and 9): 1013 while a shared
    /// store (Redis) is unreachable, which passes by itself, so the client reconnects and
    /// resyncs later; 1011 for a store that failed (a disk).
    pub fn for_store(e: &StoreError) -> Self {
        match e {
            StoreError::Unreachable(_) => {
                Self::new(TRY_AGAIN_LATER, "store unreachable: reconnect later")
            }
            _ => Self::new(INTERNAL, "storage error"),
        }
    }

    /// The close every connection gets at shutdown.
    pub fn restart() -> Self {
        Self::new(RESTART, "server restarting")
    }
}
