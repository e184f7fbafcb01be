//! The tutor endpoint's JSON messages (SPEC.md section 4): one object per text frame,
//! tagged by `"type"`. Parsing and serialising only; what a message does is the tutor
//! room's business.

use serde::{Deserialize, Serialize};

/// A message a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMessage {
    Chat {
        text: String,
        #[serde(default)]
        client_id: Option<String>,
    },
    Typing {
        active: bool,
    },
    Event {
        name: String,
        #[serde(default)]
        data: serde_json::Value,
    },
    History {
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        limit: Option<usize>,
    },
    Ping,
    /// SPEC 4.1: correcting and moderating chat (see [`crate::session::tutor`]).
    Edit {
        seq: u64,
        text: String,
    },
    Delete {
        seq: u64,
    },
    Mute {
        user: String,
        /// RFC 3339; `null` (or absent): until unmuted. A time in the past unmutes.
        #[serde(default)]
        until: Option<String>,
    },
    Remove {
        user: String,
    },
}

impl ClientMessage {
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

/// Who sent something, as other participants see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserInfo {
    pub id: String,
    pub name: String,
    pub role: String,
}

/// A user present in the session, with how many connections (tabs) it has open.
#[derive(Debug, Clone, Serialize)]
pub struct Participant {
    #[serde(flatten)]
    pub user: UserInfo,
    pub connections: usize,
    /// Whether the user is muted in this session now (SPEC 4.1).
    pub muted: bool,
}

/// A stored chat message, as sent to clients. Serialised by hand (below): a deleted one
/// is only `{"seq","deleted":true,"deleted_at"}`, so its text can be neither served nor
/// stored again (the store keeps this same JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default)]
pub struct ChatMessage {
    pub seq: u64,
    pub client_id: Option<String>,
    pub from: UserInfo,
    pub text: String,
    /// RFC 3339, UTC.
    pub ts: String,
    /// RFC 3339, when the text was last edited.
    pub edited_at: Option<String>,
    /// RFC 3339, when the message was deleted (then nothing else is kept but `seq`).
    pub deleted_at: Option<String>,
}

impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        if let Some(deleted_at) = &self.deleted_at {
            let mut st = s.serialize_struct("ChatMessage", 3)?;
            st.serialize_field("seq", &self.seq)?;
            st.serialize_field("deleted", &true)?;
            st.serialize_field("deleted_at", deleted_at)?;
            return st.end();
        }
        let edited = self.edited_at.is_some();
        let mut st = s.serialize_struct("ChatMessage", 5 + usize::from(edited))?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("client_id", &self.client_id)?;
        st.serialize_field("from", &self.from)?;
        st.serialize_field("text", &self.text)?;
        st.serialize_field("ts", &self.ts)?;
        if let Some(at) = &self.edited_at {
            st.serialize_field("edited_at", at)?;
        }
        st.end()
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceEvent {
    Joined,
    Left,
}

/// Error codes of `{"type":"error"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadMessage,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
}

/// A message the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage<'a> {
    Welcome {
        session: &'a str,
        user: &'a UserInfo,
        participants: &'a [Participant],
        last_seq: u64,
    },
    /// One page of history; every page but the last says `"more":true`.
    History {
        messages: &'a [ChatMessage],
        #[serde(skip_serializing_if = "is_false")]
        more: bool,
    },
    Chat(&'a ChatMessage),
    Presence {
        event: PresenceEvent,
        user: &'a UserInfo,
        participants: &'a [Participant],
    },
    Typing {
        from: &'a UserInfo,
        active: bool,
    },
    Event {
        from: &'a UserInfo,
        name: &'a str,
        data: &'a serde_json::Value,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: &'a str,
        /// Why, when a code has several causes (`forbidden`: `muted`).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    #[serde(rename = "chat_edited")]
    ChatEdited {
        seq: u64,
        text: &'a str,
        edited_at: &'a str,
        by: &'a UserInfo,
    },
    #[serde(rename = "chat_deleted")]
    ChatDeleted {
        seq: u64,
        deleted_at: &'a str,
        by: &'a UserInfo,
    },
    /// `action`: `mute`, `unmute` or `remove`; `until`: RFC 3339 or `null` (a mute with
    /// no end).
    Moderation {
        action: &'a str,
        user: &'a str,
        until: Option<&'a str>,
        by: &'a UserInfo,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ServerMessage<'_> {
    /// Serialises once; the result is shared by every receiver.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail (no maps with non-string keys).
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_messages() {
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"chat","text":"hi"}"#),
            Ok(ClientMessage::Chat {
                client_id: None,
                ..
            })
        ));
        assert!(matches!(
            ClientMessage::parse(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        ));
        assert!(ClientMessage::parse(r#"{"type":"nope"}"#).is_err());
        assert!(ClientMessage::parse("not json").is_err());
    }

    #[test]
    fn serialises_tagged() {
        let user = UserInfo {
            id: "u".into(),
            name: "U".into(),
            role: "student".into(),
        };
        let msg = ChatMessage {
            seq: 1,
            client_id: None,
            from: user,
            text: "hi".into(),
            ts: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&ServerMessage::Chat(&msg).to_json()).unwrap();
        assert_eq!(v["type"], "chat");
        assert_eq!(v["seq"], 1);
        assert_eq!(v["from"]["id"], "u");
        assert!(v["client_id"].is_null());
        assert_eq!(ServerMessage::Pong.to_json(), r#"{"type":"pong"}"#);
    }
}
