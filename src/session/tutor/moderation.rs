//! SPEC 4.1 in the tutor room: editing and deleting chat messages, muting and removing
//! users, and the catch-up of a resuming client on the edits it missed.
//!
//! Every change here runs on the room's lane, like a chat post (see [`super::TutorRoom`]):
//! a change is stored (and, with `persist.durability = "sync"`, flushed) before any
//! connection sees it, and every connection sees changes in the order they were stored.
//! The room's lock is taken to read what a change needs and to relay it, never across the
//! store write; what it guards here (`moderation`, `last_ts_ms`) changes only on the lane.
//! The rules:
//!
//! - Edit: the author, or a tutor or admin, any message; not a deleted one (`not_found`);
//!   a muted author may not edit (`forbidden`, reason `muted`: an edit is a way to chat).
//! - Delete: the author (muted or not), or a tutor or admin. A deleted message keeps its
//!   seq and nothing else: the stored record is overwritten with
//!   `{"seq","deleted":true,"deleted_at"}`.
//! - Mute/remove: tutors and admins; nobody moderates themself, and a tutor does not
//!   moderate an admin who is present. A mute lasts until `until` (or an unmute, i.e. a
//!   mute `until` a time in the past); a removal closes the user's connections on both
//!   endpoints with 4403 (through the watch that every connection of the session follows)
//!   and bans them for `tutor.remove_ban_s`.
//! - A resume with `after_seq=N` gets, after its history, the latest change of every
//!   message `<= N` changed at or after message N was posted: the client left after it
//!   got N, so this is a superset of what it missed, read as one range of the edit log
//!   (ordered by time) rather than a scan of the history. A change is stamped no earlier
//!   than the newest message's `ts`, so a wall clock stepped back cannot hide it.
//!
//! Must not touch: seqs (an amend never renumbers or reserves), sockets (it queues into
//! outboxes), the store's layout (it only calls the `Store` seam).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{text, Event, HistoryError, HistoryReader, Room, TutorRoom};
use crate::auth::Role;
use crate::protocol::tutor::{ChatMessage, ServerMessage, UserInfo};
use crate::store::{ChatEdit, ModerationRecord, Store, StoreError};
use crate::ws::outbox::Outbox;

/// Users removed from the session, with the end of their ban (ms since the Unix epoch) and
/// whether an admin removed them. Every connection of the session follows this and closes
/// with 4403 when its user is in it with a ban still running (an admin's connection only
/// for a ban an admin set: see [`ModerationRecord::ban_by_admin`]).
pub type RemovedUsers = Arc<HashMap<String, (u64, bool)>>;

/// Why an edit or a deletion was refused.
#[derive(Debug, thiserror::Error)]
pub enum AmendError {
    #[error("no message {0}")]
    NotFound(u64),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("you are muted in this session")]
    Muted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a mute or a removal was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModerateError {
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tutors and admins moderate (SPEC 4.1).
pub fn is_moderator(role: Role) -> bool {
    matches!(role, Role::Tutor | Role::Admin)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `ms` as RFC 3339 (UTC, milliseconds), the form every timestamp of the protocol has.
pub(crate) fn rfc3339(ms: u64) -> String {
    let at = UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH);
    humantime::format_rfc3339_millis(at).to_string()
}

/// An RFC 3339 time (`Z` or a `±HH:MM` offset) as ms since the Unix epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time");
    // `split_at_checked`: a client's string need not have a char boundary 6 bytes from
    // its end (`split_at` would panic on one).
    let tail_at = s.len().checked_sub(6);
    let (utc, offset_s): (String, i64) = match tail_at.and_then(|i| s.split_at_checked(i)) {
        Some((head, tail))
            if (tail.starts_with('+') || tail.starts_with('-')) && tail.as_bytes()[3] == b':' =>
        {
            let h: i64 = tail[1..3].parse().map_err(|_| bad())?;
            let m: i64 = tail[4..6].parse().map_err(|_| bad())?;
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (format!("{head}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (s.to_owned(), 0),
    };
    let at = humantime::parse_rfc3339_weak(&utc).map_err(|_| bad())?;
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_millis();
    let ms = i128::try_from(ms).map_err(|_| bad())? - i128::from(offset_s) * 1000;
    u64::try_from(ms).map_err(|_| bad())
}

/// Most users with a mute or a ban in force one session keeps: each is a record in memory
/// while the session is loaded and on disk, and ids are whatever a moderator sends, so
/// without a cap one tutor's client could grow them without end.
pub const MAX_MODERATED_USERS: usize = 1000;

/// What an edit does to a message.
enum Change {
    Edit(String),
    Delete,
}

impl TutorRoom {
    /// Edits message `seq` and tells everyone (`chat_edited`). Resolves to the message as
    /// now stored.
    pub fn edit_chat(
        &self,
        by: &UserInfo,
        role: Role,
        seq: u64,
        new_text: String,
    ) -> impl std::future::Future<Output = Result<ChatMessage, AmendError>> + Send + 'static {
        let by = by.clone();
        self.on_lane(move |room| room.amend(&by, role, seq, Change::Edit(new_text)))
    }

    /// Deletes message `seq` (its text is gone for good) and tells everyone
    /// (`chat_deleted`). Resolves to what is left of it.
    pub fn delete_chat(
        &self,
        by: &UserInfo,
        role: Role,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<ChatMessage, AmendError>> + Send + 'static {
        let by = by.clone();
        self.on_lane(move |room| room.amend(&by, role, seq, Change::Delete))
    }

    /// Mutes `user` until `until` (RFC 3339; `None`: until unmuted); a time in the past
    /// unmutes. Resolves to the `moderation` announcement everyone got.
    pub fn mute(
        &self,
        by: &UserInfo,
        role: Role,
        user: &str,
        until: Option<&str>,
    ) -> impl std::future::Future<Output = Result<String, ModerateError>> + Send + 'static {
        let (by, user, until) = (by.clone(), user.to_owned(), until.map(str::to_owned));
        self.on_lane(move |room| room.mute(&by, role, &user, until.as_deref()))
    }

    /// Removes `user`: their connections on both endpoints close with 4403 and new ones
    /// are refused (403) for `tutor.remove_ban_s`. Resolves to the announcement.
    pub fn remove(
        &self,
        by: &UserInfo,
        role: Role,
        user: &str,
    ) -> impl std::future::Future<Output = Result<String, ModerateError>> + Send + 'static {
        let (by, user) = (by.clone(), user.to_owned());
        self.on_lane(move |room| room.remove(&by, role, &user))
    }
}

impl Room {
    /// The session's moderation records, as loaded with the room.
    pub(super) fn load_moderation(
        store: &dyn Store,
        session: &str,
    ) -> Result<HashMap<String, ModerationRecord>, StoreError> {
        let now = now_ms();
        Ok(store
            .moderation(session)?
            .into_iter()
            .filter(|r| !r.is_spent(now))
            .map(|r| (r.user.clone(), r))
            .collect())
    }

    /// The bans in force among `records`, for the removal watch.
    pub(super) fn bans(records: &HashMap<String, ModerationRecord>) -> RemovedUsers {
        let now = now_ms();
        Arc::new(
            records
                .values()
                .filter(|r| r.banned_at(now))
                .filter_map(|r| Some((r.user.clone(), (r.banned_until_ms?, r.ban_by_admin))))
                .collect(),
        )
    }

    /// Whether `user`, acting with `role`, is muted now.
    pub fn is_muted(&self, user: &str, role: Role) -> bool {
        self.inner()
            .moderation
            .get(user)
            .is_some_and(|r| r.muted_for(now_ms(), role == Role::Admin))
    }

    /// When `user`'s ban ends (RFC 3339), if they, coming with `role`, are banned now.
    pub fn banned_until(&self, user: &str, role: Role) -> Option<String> {
        let now = now_ms();
        let inner = self.inner();
        let r = inner
            .moderation
            .get(user)
            .filter(|r| r.banned_for(now, role == Role::Admin))?;
        r.banned_until_ms.map(rfc3339)
    }

    /// Follows edits and deletions: the stamp (ms) of the latest one, so a long poll wakes
    /// on any made after it arrived, even one made before it subscribed.
    pub fn subscribe_amends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.amends.subscribe()
    }

    /// Follows the removed users (every connection of the session watches it).
    pub fn removals(&self) -> tokio::sync::watch::Receiver<RemovedUsers> {
        self.removed.subscribe()
    }

    fn amend(
        &self,
        by: &UserInfo,
        role: Role,
        seq: u64,
        change: Change,
    ) -> Result<ChatMessage, AmendError> {
        if !role.can_write() {
            return Err(AmendError::Forbidden("viewers may not change chat"));
        }
        debug_assert!(
            super::super::lane::on_lane_thread(),
            "a chat change off the lane"
        );
        // On the lane, the only place messages change: read without the room's lock.
        let message = self
            .store
            .chat_get(&self.session, seq)?
            .filter(|m| m.deleted_at.is_none())
            .ok_or(AmendError::NotFound(seq))?;
        if message.from.id != by.id && !is_moderator(role) {
            return Err(AmendError::Forbidden(
                "only its author, a tutor or an admin may change a message",
            ));
        }
        let now = now_ms();
        let (muted, last_ts_ms) = {
            let inner = self.inner();
            let muted = inner
                .moderation
                .get(&by.id)
                .is_some_and(|r| r.muted_at(now));
            (muted, inner.last_ts_ms)
        };
        if matches!(change, Change::Edit(_)) && !is_moderator(role) && muted {
            return Err(AmendError::Muted);
        }
        // The previous entry of this message in the edit log (the log keeps one per message).
        let previous_at_ms = message
            .edited_at
            .as_deref()
            .and_then(|at| parse_time(at).ok());
        // Never before the newest message: see `Inner::last_ts_ms`.
        let at_ms = now.max(last_ts_ms);
        let at = rfc3339(at_ms);
        let amended = match change {
            Change::Edit(new_text) => ChatMessage {
                text: new_text,
                edited_at: Some(at.clone()),
                ..message
            },
            Change::Delete => ChatMessage {
                seq,
                deleted_at: Some(at.clone()),
                ..ChatMessage::default()
            },
        };
        let edit = ChatEdit {
            seq,
            at_ms,
            by: by.clone(),
        };
        self.store
            .chat_amend(&self.session, &amended, &edit, previous_at_ms)?;
        if self.flush_before_relay {
            self.store.flush()?;
        }
        let json = change_frame(&amended, by);
        self.publish(Event::Relay { json: json.clone() });
        self.publish(Event::Amended { at_ms });
        self.relay_amend(seq, json);
        self.amends
            .send_modify(|latest| *latest = (*latest).max(at_ms));
        Ok(amended)
    }

    /// See [`TutorRoom::mute`]; runs on the room's lane.
    fn mute(
        &self,
        by: &UserInfo,
        role: Role,
        user: &str,
        until: Option<&str>,
    ) -> Result<String, ModerateError> {
        let until_ms = until
            .map(parse_time)
            .transpose()
            .map_err(ModerateError::BadRequest)?;
        let now = now_ms();
        let unmute = until_ms.is_some_and(|u| u <= now);
        self.moderate(by, role, user, |record| {
            if unmute {
                record.muted = false;
                record.muted_until_ms = None;
                ("unmute", None)
            } else {
                record.muted = true;
                record.muted_until_ms = until_ms;
                record.mute_by_admin = role == Role::Admin;
                ("mute", until_ms)
            }
        })
    }

    /// See [`TutorRoom::remove`]; runs on the room's lane.
    fn remove(&self, by: &UserInfo, role: Role, user: &str) -> Result<String, ModerateError> {
        let ban_ms = u64::try_from(self.remove_ban.as_millis()).unwrap_or(u64::MAX);
        let until = now_ms().saturating_add(ban_ms);
        self.moderate(by, role, user, |record| {
            record.banned_until_ms = Some(until);
            record.ban_by_admin = role == Role::Admin;
            ("remove", Some(until))
        })
    }

    fn moderate(
        &self,
        by: &UserInfo,
        role: Role,
        user: &str,
        apply: impl FnOnce(&mut ModerationRecord) -> (&'static str, Option<u64>),
    ) -> Result<String, ModerateError> {
        if !is_moderator(role) {
            return Err(ModerateError::Forbidden(
                "only tutors and admins may mute or remove",
            ));
        }
        if user.is_empty() || user.len() > 256 {
            return Err(ModerateError::BadRequest(
                "user must be a user id of 1 to 256 bytes".into(),
            ));
        }
        if user == by.id {
            return Err(ModerateError::Forbidden("you may not moderate yourself"));
        }
        debug_assert!(
            super::super::lane::on_lane_thread(),
            "moderation off the lane"
        );
        let mut inner = self.inner();
        let target_is_admin = inner
            .members
            .values()
            .any(|m| m.user.id == user && m.user.role == Role::Admin.as_str());
        if target_is_admin && role != Role::Admin {
            return Err(ModerateError::Forbidden(
                "a tutor may not moderate an admin",
            ));
        }
        let now = now_ms();
        // Mutes and bans that ended are forgotten here (they change nothing any more).
        inner.moderation.retain(|_, r| !r.is_spent(now));
        if !inner.moderation.contains_key(user) && inner.moderation.len() >= MAX_MODERATED_USERS {
            self.metrics.limit_refused("moderated_users");
            return Err(ModerateError::BadRequest(format!(
                "at most {MAX_MODERATED_USERS} users may be muted or removed in a session at once"
            )));
        }
        let mut record = inner.moderation.get(user).cloned().unwrap_or_default();
        record.user = user.to_owned();
        if !record.muted_at(now) {
            record.muted = false;
            record.muted_until_ms = None;
            record.mute_by_admin = false;
        }
        if !record.banned_at(now) {
            record.banned_until_ms = None;
            record.ban_by_admin = false;
        }
        let (action, until_ms) = apply(&mut record);
        // Not held across the store write: `moderation` changes only on the lane, so
        // nothing changes it meanwhile.
        drop(inner);
        self.store.set_moderation(&self.session, &record)?;
        if self.flush_before_relay {
            self.store.flush()?;
        }
        let mut inner = self.inner();
        let published = record.clone();
        if record.is_spent(now) {
            inner.moderation.remove(user);
        } else {
            inner.moderation.insert(user.to_owned(), record);
        }
        let until = until_ms.map(rfc3339);
        let json = ServerMessage::Moderation {
            action,
            user,
            until: until.as_deref(),
            by,
        }
        .to_json();
        self.publish(Event::Moderation {
            record: published,
            json: json.clone(),
            removed: action == "remove",
        });
        let msg = text(json.clone());
        inner.members.broadcast(&msg, None);
        if action == "remove" {
            // After the announcement is queued: the removed user's connections write it,
            // then close with 4403.
            self.removed.send_replace(Self::bans(&inner.moderation));
        }
        Ok(json)
    }
}

/// `chat_edited` or `chat_deleted` for a message as stored after a change by `by`.
fn change_frame(message: &ChatMessage, by: &UserInfo) -> String {
    match &message.deleted_at {
        Some(deleted_at) => ServerMessage::ChatDeleted {
            seq: message.seq,
            deleted_at,
            by,
        }
        .to_json(),
        None => ServerMessage::ChatEdited {
            seq: message.seq,
            text: &message.text,
            edited_at: message.edited_at.as_deref().unwrap_or(&message.ts),
            by,
        }
        .to_json(),
    }
}

/// A page of changes: the frames, and where the next page starts (`None`: the end).
pub type ChangesPage = (Vec<String>, Option<(u64, u64)>);

/// Edit-log entries read per store call during a catch-up.
const CHANGES_PAGE: usize = 200;

impl HistoryReader {
    /// The latest change of every message `<= after` changed at or after message `after`
    /// was posted, as `chat_edited`/`chat_deleted` frames, oldest change first. One page
    /// (up to `CHANGES_PAGE` log entries) from `cursor` on; the cursor to go on from,
    /// `None` at the end.
    pub fn changes_page(
        &self,
        after: u64,
        cursor: Option<(u64, u64)>,
    ) -> Result<ChangesPage, StoreError> {
        let store = &self.store;
        let cursor = match cursor {
            Some(c) => c,
            None => {
                // Changes from the time message `after` was posted (0: all of the log).
                let since = store
                    .chat_get(&self.session, after)?
                    .and_then(|m| parse_time(&m.ts).ok())
                    .unwrap_or(0);
                (since, 0)
            }
        };
        let edits = store.chat_edits_after(&self.session, cursor, CHANGES_PAGE)?;
        let next = match edits.last() {
            Some(last) if edits.len() >= CHANGES_PAGE => Some((last.at_ms, last.seq)),
            _ => None,
        };
        let mut frames = Vec::new();
        for edit in edits.iter().filter(|e| e.seq <= after) {
            // The message as it is now (trimmed since: nothing to converge on).
            if let Some(message) = store.chat_get(&self.session, edit.seq)? {
                if message.deleted_at.is_some() || message.edited_at.is_some() {
                    frames.push(change_frame(&message, &edit.by));
                }
            }
        }
        Ok((frames, next))
    }

    /// Sends the changes a client resuming after `after` missed (see the module docs),
    /// read on the blocking pool a page at a time, each page queued once the previous one
    /// is written.
    pub async fn send_changes(&self, after: u64, outbox: &Outbox) -> Result<(), HistoryError> {
        let mut cursor = None;
        loop {
            let reader = self.clone();
            let (frames, next) =
                tokio::task::spawn_blocking(move || reader.changes_page(after, cursor))
                    .await
                    .map_err(|e| HistoryError::Task(e.to_string()))??;
            outbox.written().await;
            for frame in frames {
                if !outbox.send(text(frame)) && !outbox.is_open() {
                    return Ok(());
                }
            }
            match next {
                Some(n) => cursor = Some(n),
                None => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_with_z_and_offsets() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("1970-01-01T00:00:01.250Z"), Ok(1250));
        assert_eq!(parse_time("1970-01-01T01:00:01+01:00"), Ok(1000));
        assert_eq!(parse_time("1970-01-01T00:00:01-00:30"), Ok(1_801_000));
        assert!(parse_time("tomorrow").is_err());
        assert!(parse_time("").is_err());
        assert!(parse_time("1969-12-31T23:00:00Z").is_err());
        assert_eq!(parse_time(&rfc3339(1_234_567)), Ok(1_234_567));
        // A client's string whose 6th byte from the end is inside a character.
        assert!(parse_time("\u{20ac}\u{20ac}\u{e9}").is_err());
        assert!(parse_time("2026-01-01T00:00:00\u{20ac}\u{20ac}\u{e9}").is_err());
    }

    #[test]
    fn a_deleted_message_serialises_without_its_text() {
        let m = ChatMessage {
            seq: 4,
            text: "secret".into(),
            deleted_at: Some("2026-01-01T00:00:00.000Z".into()),
            ..Default::default()
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"seq":4,"deleted":true,"deleted_at":"2026-01-01T00:00:00.000Z"}"#
        );
        let back: ChatMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back.seq, 4);
        assert!(back.deleted_at.is_some() && back.text.is_empty());
        let chat = ServerMessage::Chat(&ChatMessage {
            seq: 1,
            text: "hi".into(),
            edited_at: Some("2026-01-01T00:00:00.000Z".into()),
            ..Default::default()
        })
        .to_json();
        let v: serde_json::Value = serde_json::from_str(&chat).unwrap();
        assert_eq!(v["type"], "chat");
        assert_eq!(v["text"], "hi");
        assert_eq!(v["edited_at"], "2026-01-01T00:00:00.000Z");
    }

    /// A moderator's client cannot grow a session's moderation records without end.
    #[tokio::test]
    async fn moderated_users_are_capped() {
        let store: Arc<dyn Store> = Arc::new(crate::store::MemoryStore::default());
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let room = TutorRoom::load(
            "s".into(),
            store.clone(),
            metrics.clone(),
            100,
            false,
            Duration::from_secs(600),
        )
        .unwrap();
        let tutor = UserInfo {
            id: "tina".into(),
            name: "Tina".into(),
            role: "tutor".into(),
        };
        for i in 0..MAX_MODERATED_USERS {
            room.mute(&tutor, Role::Tutor, &format!("u{i}"), None)
                .await
                .unwrap();
        }
        let over = room.remove(&tutor, Role::Tutor, "one-more").await;
        assert!(
            matches!(over, Err(ModerateError::BadRequest(_))),
            "{over:?}"
        );
        assert_eq!(store.moderation("s").unwrap().len(), MAX_MODERATED_USERS);
        assert!(
            metrics
                .render()
                .contains(r#"easel_limit_refusals_total{limit="moderated_users"} 1"#),
            "the refusal is counted"
        );
        // Those already moderated still may be: unmuting makes room.
        room.mute(&tutor, Role::Tutor, "u0", Some("1970-01-01T00:00:01Z"))
            .await
            .unwrap();
        room.remove(&tutor, Role::Tutor, "one-more").await.unwrap();
    }

    #[test]
    fn mutes_and_bans_end_on_time() {
        let r = ModerationRecord {
            user: "u".into(),
            muted: true,
            muted_until_ms: Some(100),
            banned_until_ms: Some(50),
            ..Default::default()
        };
        assert!(r.muted_at(99) && !r.muted_at(100));
        assert!(r.banned_at(49) && !r.banned_at(50));
        assert!(r.is_spent(100));
        let forever = ModerationRecord {
            muted: true,
            ..Default::default()
        };
        assert!(forever.muted_at(u64::MAX));
        // A tutor's mute and ban do not hold against an admin; an admin's do.
        assert!(r.muted_for(99, false) && !r.muted_for(99, true));
        assert!(r.banned_for(49, false) && !r.banned_for(49, true));
        let by_admin = ModerationRecord {
            mute_by_admin: true,
            ban_by_admin: true,
            ..r
        };
        assert!(by_admin.muted_for(99, true) && by_admin.banned_for(49, true));
    }
}
