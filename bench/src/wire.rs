//! The WebSocket pieces the bench's own client and server share (`easel-loadgen`'s raw
//! storm joiner, `trivial-join`): opcodes, the accept hash, frame building. The server's
//! own framing (`src/ws/socket.rs`) is not linked: the bench reaches easel only over
//! sockets.

use base64::Engine;
use sha1::{Digest, Sha1};

pub const OP_CONT: u8 = 0;
pub const OP_TEXT: u8 = 1;
pub const OP_BINARY: u8 = 2;
pub const OP_CLOSE: u8 = 8;
pub const OP_PING: u8 = 9;
pub const OP_PONG: u8 = 10;

/// The 4 bytes a sync flush ends with: the sender removes them from each compressed
/// message, the receiver puts them back before inflating (RFC 7692 7.2.1, 7.2.2).
pub const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 1.3).
pub fn accept_key(key: &str) -> String {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// One final frame, header and payload in one buffer: masked with `mask` (a client's
/// frame, RFC 6455 5.3) or not (a server's); RSV1 marks a compressed message.
pub fn frame(opcode: u8, rsv1: bool, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(masked | n as u8),
        n if n <= 0xffff => {
            f.push(masked | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(masked | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            f.extend_from_slice(&mask);
            f.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_example_key_and_every_length_form() {
        // RFC 6455 1.3's example.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(frame(OP_BINARY, false, None, b"hi"), [0x82, 2, b'h', b'i']);
        assert_eq!(
            frame(OP_CLOSE, true, None, &[0; 200])[..4],
            [0xc8, 126, 0, 200]
        );
        let big = frame(OP_BINARY, false, None, &[0; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 10 + 70_000);
        let masked = frame(OP_BINARY, false, Some([1, 2, 3, 4]), &[0, 0, 0, 0, 5]);
        assert_eq!(masked, [0x82, 0x85, 1, 2, 3, 4, 1, 2, 3, 4, 4]);
    }
}
