//! Key names of the Redis layout (the table in [`super`]): every key of a session carries
//! the hash tag `{<session>}`, so in a Redis Cluster a session lives in one slot and its
//! scripts touch one node. Owns: building key names. Must not touch: connections or values.

/// Prefix of every key easel writes.
pub(super) const PREFIX: &str = "easel:";
/// The set of every session with anything stored (its own slot in a Redis Cluster).
pub(super) const SESSIONS: &str = "easel:sessions";

/// The name of one of `session`'s keys: `easel:{<session>}:<suffix>`.
pub(super) fn session_key(session: &str, suffix: &str) -> String {
    format!("{PREFIX}{{{session}}}:{suffix}")
}

/// The doorbell (one Redis server only, not a Redis Cluster): every append and event
/// names its session here too, so a node's reader blocks on this one key and then reads
/// only the sessions named, instead of naming three keys per session held in every
/// blocking read (whose cost in Redis grows with the keys).
pub(super) const BELL: &str = "easel:bell";
/// Entries the doorbell keeps (approximately); a reader further behind catches up with
/// its periodic full read.
pub(super) const BELL_MAXLEN: u64 = 10_000;

/// The heartbeat key of a node.
pub(super) fn node_key(node: &str) -> String {
    format!("{PREFIX}node:{node}")
}

/// Key suffixes (what each holds: the table in [`super`]).
pub(super) const WB: &str = "wb";
pub(super) const WB_SEQ: &str = "wb:seq";
pub(super) const VERSIONS: &str = "v";
pub(super) const VERSION_STATES: &str = "vs";
pub(super) const META: &str = "meta";
pub(super) const LEASE: &str = "lease";
pub(super) const CHAT: &str = "chat";
pub(super) const CHAT_SEQ: &str = "chat:seq";
pub(super) const CHAT_AMENDED: &str = "chat:amended";
pub(super) const EDITS: &str = "edits";
pub(super) const EDITS_BY_SEQ: &str = "edits:seq";
pub(super) const MODERATION: &str = "moderation";
pub(super) const EVENTS: &str = "ev";
pub(super) const PRESENCE: &str = "presence";
pub(super) const PRESENCE_INFO: &str = "presence:info";

/// Every key of a session that holds stored state (not presence, not the lease).
pub(super) const STORED: [&str; 12] = [
    WB,
    WB_SEQ,
    VERSIONS,
    VERSION_STATES,
    META,
    CHAT,
    CHAT_SEQ,
    CHAT_AMENDED,
    EDITS,
    EDITS_BY_SEQ,
    MODERATION,
    EVENTS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_hash_tag() {
        assert_eq!(session_key("s-1", WB_SEQ), "easel:{s-1}:wb:seq");
        assert_eq!(node_key("n1"), "easel:node:n1");
    }
}
