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
}

impl ClientMessage {
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

/// Who sent something, as other participants see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// A stored chat message, as sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub seq: u64,
    pub client_id: Option<String>,
    pub from: UserInfo,
    pub text: String,
    /// RFC 3339, UTC.
    pub ts: String,
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
