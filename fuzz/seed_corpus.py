#!/usr/bin/env python3
"""Seeds fuzz/corpus/TARGET/ (git-ignored) from fixtures/ and fixtures/hostile/.

Run from anywhere: python3 fuzz/seed_corpus.py. libFuzzer then grows each corpus itself.
"""
import hashlib
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures")
HOSTILE = os.path.join(FIX, "hostile")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def var(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n == 0:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def var_buf(b):
    return var(len(b)) + b


def split_updates(data):
    out, pos = [], 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def put(target, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


recorded = sorted(n for n in os.listdir(FIX) if n.endswith(".updates"))
states = sorted(n for n in os.listdir(FIX) if n.endswith(".state.bin"))
# Files only: open/ (findings not fixed, not replayed) and regressions/ (replayed by its own
# test) are directories.
hostile = sorted(
    n
    for n in os.listdir(HOSTILE)
    if n != "README.md" and os.path.isfile(os.path.join(HOSTILE, n))
)

updates = []
for n in recorded:
    updates += split_updates(read(os.path.join(FIX, n)))[:100]
updates += [read(os.path.join(FIX, n)) for n in states]

for u in updates:
    put("guard_update", u)
    put("wire_frame", b"\x00\x02" + var_buf(u))
for n in recorded:
    put("whiteboard_restore", read(os.path.join(FIX, n)))
# A whole recorded session followed by its own state: duplicates integrate as no-ops.
for n, s in zip(recorded, sorted(states)):
    state = read(os.path.join(FIX, s))
    put("whiteboard_restore", read(os.path.join(FIX, n)) + struct.pack(">I", len(state)) + state)

# State vectors: a few plausible ones.
for entries in ([], [(1, 5)], [(7, 3), (2**53 - 1, 1)], [(1234567, 100), (89, 2**32 - 1)]):
    sv = var(len(entries)) + b"".join(var(c) + var(k) for c, k in entries)
    put("state_vector", sv)
    put("wire_frame", b"\x00\x00" + var_buf(sv))

aw = var(2) + var(7) + var(1) + var_buf(b'{"user":{"name":"a"},"cursor":[1,2]}')
aw += var(8) + var(3) + var_buf(b"null")
put("awareness", aw)
put("wire_frame", b"\x01" + var_buf(aw))
put("wire_frame", b"\x03")

for n in hostile:
    data = read(os.path.join(HOSTILE, n))
    kind = n.split(".")[0]
    if kind == "updates":
        # The first 100 updates of a stream (the map chain is refused at the 64th).
        put("whiteboard_restore", b"".join(struct.pack(">I", len(u)) + u for u in split_updates(data)[:100]))
        continue
    if len(data) > 65536:
        continue
    if kind == "update":
        put("guard_update", data)
        put("wire_frame", b"\x00\x02" + var_buf(data))
        put("whiteboard_restore", struct.pack(">I", len(data)) + data)
    elif kind == "sv":
        put("state_vector", data)
    elif kind == "awareness":
        put("awareness", data)
    elif kind == "frame":
        put("wire_frame", data)

# ws_reader: [settings][read size] then a client's frames (masked, as RFC 6455 requires).
def ws_frame(opcode, payload, fin=True, rsv1=False, mask=b"\x11\x22\x33\x44"):
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def deflated(data):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]  # RFC 7692 7.2.1: the empty block's 00 00 ff ff is left off


sync_step1 = b"\x00\x00" + var_buf(var(0))
big = b"stroke " * 400
streams = [
    ws_frame(0x2, sync_step1) + ws_frame(0x9, b"hi") + ws_frame(0x8, struct.pack(">H", 1000)),
    ws_frame(0x1, b'{"type":"chat","text":"hello"}') + ws_frame(0x1, "héllo".encode()),
    ws_frame(0x2, big[:1000], fin=False) + ws_frame(0xA, b"") + ws_frame(0x0, big[1000:]),
    ws_frame(0x2, deflated(big), rsv1=True) + ws_frame(0x1, deflated(b'{"type":"ping"}'), rsv1=True),
    ws_frame(0x2, deflated(big)[:20], fin=False, rsv1=True) + ws_frame(0x0, deflated(big)[20:]),
    ws_frame(0x2, big) + ws_frame(0x2, b"\x00\x01\x02"),
    ws_frame(0x8, struct.pack(">H", 1001) + b"going"),
]
for stream in streams:
    for settings in (0, 1, 5, 7):
        for piece in (0, 6, 255):
            put("ws_reader", bytes([settings, piece]) + stream)
for n in updates[:20]:
    put("ws_reader", b"\x05\xff" + ws_frame(0x2, b"\x00\x02" + var_buf(n)))
print("seeded", {t: len(os.listdir(os.path.join(CORPUS, t))) for t in sorted(os.listdir(CORPUS))})
