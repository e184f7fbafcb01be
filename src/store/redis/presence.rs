//! Presence across nodes (connection counts per node and user, in one hash per session)
//! and node heartbeats (`easel:node:<id>` with a TTL), for `src/cluster/`: it tells a
//! user's first and last connection anywhere from the totals these return, and sweeps a
//! dead node's counts with [`RedisStore::presence_drop_node`] once [`RedisStore::node_alive`]
//! says its heartbeat is gone.
//!
//! Owns: the presence, presence:info and node keys. Must not touch: stored session state.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::Value;

use super::keys::{self, node_key, session_key};
use super::values::{self, corrupt};
use super::{now_ms, RedisStore};
use crate::protocol::tutor::UserInfo;
use crate::store::sled::keys::check_session_id;
use crate::store::StoreError;

/// One user's connections on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEntry {
    pub node: String,
    pub user: UserInfo,
    pub count: u64,
}

/// What a presence change left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceChange {
    /// The changed user's connections across every node after the change (0 for
    /// [`RedisStore::presence_drop_node`]); 0 after a count of 0 is the user's last
    /// connection anywhere gone (`left`).
    pub total: u64,
    /// Users whose total went to 0 with this change (for a drop: every user the dead node
    /// held and no other node has), sorted by id.
    pub gone: Vec<UserInfo>,
    /// The whole presence after the change, by user id then node.
    pub presence: Vec<PresenceEntry>,
}

impl RedisStore {
    /// Sets `user`'s count of connections on this node (0: none left here).
    pub fn presence_change(
        &self,
        session: &str,
        user: &UserInfo,
        connections: u64,
    ) -> Result<PresenceChange, StoreError> {
        check_session_id(session)?;
        let info = serde_json::to_vec(user)
            .map_err(|e| StoreError::io_while("cannot encode a user", e))?;
        let mut call = self.scripts.presence_change.prepare_invoke();
        call.key(session_key(session, keys::PRESENCE))
            .key(session_key(session, keys::PRESENCE_INFO))
            .arg(&self.node_id)
            .arg(&user.id)
            .arg(connections)
            .arg(info);
        let reply = self
            .pool
            .run("presence change", |con| call.invoke::<Value>(con))?;
        let what = "presence_change reply";
        let [total, counts, infos] = values::items(&reply, what)? else {
            return Err(corrupt(what));
        };
        let gone = match values::number(total, what)? {
            total if total <= 0 && connections == 0 => vec![user.clone()],
            _ => Vec::new(),
        };
        Ok(PresenceChange {
            total: values::unsigned(total, what).unwrap_or(0),
            gone,
            presence: presence_entries(counts, infos)?,
        })
    }

    /// Every user present in the session, on every node.
    pub fn presence(&self, session: &str) -> Result<Vec<PresenceEntry>, StoreError> {
        check_session_id(session)?;
        let mut call = self.scripts.presence_read.prepare_invoke();
        call.key(session_key(session, keys::PRESENCE))
            .key(session_key(session, keys::PRESENCE_INFO));
        let reply = self
            .pool
            .run("presence read", |con| call.invoke::<Value>(con))?;
        let what = "presence_read reply";
        let [counts, infos] = values::items(&reply, what)? else {
            return Err(corrupt(what));
        };
        presence_entries(counts, infos)
    }

    /// Removes every connection count of `node` in the session (a node found dead).
    pub fn presence_drop_node(
        &self,
        session: &str,
        node: &str,
    ) -> Result<PresenceChange, StoreError> {
        check_session_id(session)?;
        let mut call = self.scripts.presence_drop_node.prepare_invoke();
        call.key(session_key(session, keys::PRESENCE))
            .key(session_key(session, keys::PRESENCE_INFO))
            .arg(node);
        let reply = self
            .pool
            .run("presence drop", |con| call.invoke::<Value>(con))?;
        let what = "presence_drop_node reply";
        let [gone, counts, infos] = values::items(&reply, what)? else {
            return Err(corrupt(what));
        };
        let mut gone_users = Vec::new();
        for (id, info) in values::pairs(gone, what)? {
            let id = values::text(id, what)?.unwrap_or_default();
            gone_users.push(user_info(&id, info));
        }
        gone_users.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(PresenceChange {
            total: 0,
            gone: gone_users,
            presence: presence_entries(counts, infos)?,
        })
    }

    /// Says this node is alive for `ttl` (call it more often than that).
    pub fn heartbeat(&self, ttl: Duration) -> Result<(), StoreError> {
        let key = node_key(&self.node_id);
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        self.pool.run("heartbeat", |con| {
            redis::cmd("SET")
                .arg(&key)
                .arg(now_ms())
                .arg("PX")
                .arg(ttl_ms)
                .query::<Value>(con)
        })?;
        Ok(())
    }

    /// Whether `node`'s heartbeat is still there.
    pub fn node_alive(&self, node: &str) -> Result<bool, StoreError> {
        let key = node_key(node);
        let reply: Value = self.pool.run("EXISTS node", |con| {
            redis::cmd("EXISTS").arg(&key).query(con)
        })?;
        Ok(values::number(&reply, "EXISTS")? > 0)
    }
}

/// A user's info as stored, or just its id when that does not decode.
fn user_info(id: &str, info: &Value) -> UserInfo {
    values::bytes(info, "user info")
        .ok()
        .flatten()
        .and_then(|json| serde_json::from_slice::<UserInfo>(&json).ok())
        .unwrap_or_else(|| UserInfo {
            id: id.to_owned(),
            ..Default::default()
        })
}

/// The presence hash (`node\nuser` → count) joined with the info hash.
fn presence_entries(counts: &Value, infos: &Value) -> Result<Vec<PresenceEntry>, StoreError> {
    let what = "presence hash";
    let mut info_by_user = BTreeMap::new();
    for (id, info) in values::pairs(infos, what)? {
        let id = values::text(id, what)?.unwrap_or_default();
        let info = user_info(&id, info);
        info_by_user.insert(id, info);
    }
    let mut entries = Vec::new();
    for (field, count) in values::pairs(counts, what)? {
        let field = values::text(field, what)?.unwrap_or_default();
        let Some((node, user)) = field.split_once('\n') else {
            continue;
        };
        let count = values::number(count, what)?;
        if count <= 0 {
            continue;
        }
        let user = info_by_user.get(user).cloned().unwrap_or_else(|| UserInfo {
            id: user.to_owned(),
            ..Default::default()
        });
        entries.push(PresenceEntry {
            node: node.to_owned(),
            user,
            count: count as u64,
        });
    }
    entries.sort_by(|a, b| (&a.user.id, &a.node).cmp(&(&b.user.id, &b.node)));
    Ok(entries)
}
