"""The ``tml serve`` wire protocol, version 1: one websocket per session, binary frames.

Every frame is **one kind byte followed by its payload** (the byte-tagged frames of
Moshi's server, where ``b"\\x00"`` is the handshake and ``b"\\x01" + opus`` audio). tml
sends raw PCM16 instead of Opus (200 ms at 16 kHz is 6,400 bytes; loopback and LAN
researchers need no codec) and tags the direction in the kind: client kinds are
``0x0_``, server kinds ``0x1_``, so a frame sent the wrong way is refused, not misread.

Client → server:

====  ===========  ==============================================================
kind  name         payload
====  ===========  ==============================================================
0x00  HANDSHAKE    UTF-8 JSON ``{"version": 1, "seed": int, "context": str,
                   "token": str, "temperature": float, "top_p": float}`` (all but
                   ``version`` optional); opens the session. Must be the first frame.
0x01  AUDIO        PCM16 little-endian mono 16 kHz, exactly one 200 ms micro-turn:
                   3,200 samples = 6,400 bytes.
0x02  VIDEO        one JPEG or PNG frame (checked by its magic bytes); up to two
                   join the next audio chunk's micro-turn as its frame pair (video at
                   10 fps; one frame alone is duplicated; a third is refused with
                   ``video_rate``).
0x03  TEXT         UTF-8 typed text; joins the next audio chunk's micro-turn.
0x04  CONTROL      UTF-8 JSON ``{"action": "open" | "close" | "rollback" |
                   "cancel", ...}``: ``open`` takes ``seed``/``context`` (a new
                   session on this socket after ``close``), ``rollback`` takes
                   ``micro_turn`` (return to before it), ``cancel`` drops queued,
                   not yet served input and running delegations.
0x05  PING         any bytes (≤ 64); answered by PONG with the same bytes.
====  ===========  ==============================================================

Server → client:

====  ============  =============================================================
kind  name          payload
====  ============  =============================================================
0x10  HANDSHAKE     UTF-8 JSON ``{"version": 1, "session": int, "sample_rate":
                    16000, "chunk_samples": 3200, "tick_ms": int, "limits": {...}}``
0x11  MODEL_AUDIO   uint32 LE micro-turn index, then the vocoded waveform as PCM16
                    LE mono 16 kHz (3,200 samples when the model spoke).
0x12  MODEL_TEXT    uint32 LE micro-turn index, then the model's UTF-8 text.
0x13  MODEL_EVENT   UTF-8 JSON ``{"micro_turn": int, "event": str, ...}``: the
                    model's control actions (``{"event": "control", "actions":
                    [...]}``), delegation (``delegated`` with the ``request``,
                    later ``background`` with its ``result``, which joins the next
                    micro-turn's input after ``<bg>``; :mod:`tml.serve.delegation`)
                    and replies to CONTROL frames (``opened``, ``closed``,
                    ``rolled_back``, ``cancelled``).
0x14  TICK          UTF-8 JSON per served micro-turn: ``micro_turn``, ``tick``,
                    ``queue_ms`` (chunk arrival → tick start), ``engine_ms`` (the
                    engine's tick), ``vocoder_ms`` (this session's vocoding),
                    ``batch`` (sessions in the tick), ``tokens``, ``logprobs`` (hex of
                    the float32 bits, raw), ``forced_end``, ``speaking``, ``video``
                    (frames of the micro-turn's pair the server received: 0, 1, 2).
0x15  ERROR         UTF-8 JSON ``{"code": str, "message": str}``; the session lives
                    on unless the server closes the socket after it.
0x16  PONG          the PING's bytes.
====  ============  =============================================================

:func:`decode` checks the kind, the direction, the length and the payload
(JSON objects, UTF-8, image magic) and raises :class:`ProtocolError` with a ``code``
and a message that says what to send instead. :func:`encode` builds any frame.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

VERSION = 1
SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 3_200                  # one 200 ms micro-turn (tml.stream.SAMPLES_PER_MICRO_TURN)
AUDIO_BYTES = 2 * CHUNK_SAMPLES        # PCM16
MAX_JSON_BYTES = 4_096
MAX_TEXT_BYTES = 4_096
MAX_VIDEO_BYTES = 1 << 20
MAX_PING_BYTES = 64
CONTROL_ACTIONS = ("open", "close", "rollback", "cancel")
IMAGE_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


class Kind(IntEnum):
    HANDSHAKE = 0x00
    AUDIO = 0x01
    VIDEO = 0x02
    TEXT = 0x03
    CONTROL = 0x04
    PING = 0x05
    SERVER_HANDSHAKE = 0x10
    MODEL_AUDIO = 0x11
    MODEL_TEXT = 0x12
    MODEL_EVENT = 0x13
    TICK = 0x14
    ERROR = 0x15
    PONG = 0x16


CLIENT_KINDS = frozenset(k for k in Kind if k < 0x10)
SERVER_KINDS = frozenset(k for k in Kind if k >= 0x10)


class ProtocolError(ValueError):
    """A frame that breaks the protocol. ``code`` is the ERROR frame's machine-readable code
    (``empty``, ``unknown_kind``, ``wrong_direction``, ``bad_length``, ``oversized``,
    ``bad_payload``, ``version``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Frame:
    """A decoded frame. ``value`` by kind: AUDIO float32 [3200] in [-1, 1); TEXT str;
    HANDSHAKE/CONTROL/SERVER_HANDSHAKE/MODEL_EVENT/TICK/ERROR dict; VIDEO/PING/PONG bytes;
    MODEL_AUDIO (micro_turn, float32 [n]); MODEL_TEXT (micro_turn, str)."""

    kind: Kind
    value: object


def _json(kind: Kind, payload: bytes) -> dict:
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError("oversized", f"{kind.name} JSON is {len(payload)} bytes, at most {MAX_JSON_BYTES}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError("bad_payload", f"{kind.name} payload must be a UTF-8 JSON object: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_payload", f"{kind.name} payload must be a JSON object, got {type(obj).__name__}")
    return obj


def _utf8(kind: Kind, payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError("bad_payload", f"{kind.name} payload must be UTF-8 text: {e}") from None


def pcm16_to_float(payload: bytes) -> np.ndarray:
    """PCM16 LE bytes → float32 [n] in [-1, 1) (int16 / 32768)."""
    return np.frombuffer(payload, "<i2").astype(np.float32) / 32768.0


def float_to_pcm16(x: np.ndarray) -> bytes:
    """float [n] in [-1, 1] → PCM16 LE bytes (× 32768, rounded to nearest, clipped), the
    inverse of :func:`pcm16_to_float` on its outputs."""
    return np.clip(np.rint(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def decode(data: bytes, *, sender: str = "client", max_bytes: int | None = None) -> Frame:
    """One websocket binary message → :class:`Frame`; ``sender`` is ``"client"`` (what
    the server reads) or ``"server"`` (what a client reads). Raises :class:`ProtocolError`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError("oversized", f"a {len(data)}-byte message exceeds the server's limit of {max_bytes} "
                                         "bytes: send one 200 ms chunk, one frame or one text per message")
    if not data:
        raise ProtocolError("empty", "empty message: every frame starts with its kind byte")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise ProtocolError("unknown_kind", f"unknown kind byte 0x{data[0]:02x} (protocol version {VERSION} "
                                            f"knows {', '.join(f'0x{k:02x} {k.name}' for k in Kind)})") from None
    allowed = CLIENT_KINDS if sender == "client" else SERVER_KINDS
    if kind not in allowed:
        raise ProtocolError("wrong_direction", f"{kind.name} (0x{kind:02x}) is a "
                                               f"{'server' if sender == 'client' else 'client'} frame; "
                                               f"a {sender} sends kinds {sorted(int(k) for k in allowed)}")
    p = bytes(data[1:])
    if kind == Kind.AUDIO:
        if len(p) != AUDIO_BYTES:
            raise ProtocolError("bad_length", f"AUDIO must carry exactly one 200 ms chunk: {CHUNK_SAMPLES} PCM16 "
                                              f"samples at {SAMPLE_RATE} Hz = {AUDIO_BYTES} bytes, got {len(p)}")
        return Frame(kind, pcm16_to_float(p))
    if kind == Kind.VIDEO:
        if len(p) > MAX_VIDEO_BYTES:
            raise ProtocolError("oversized", f"VIDEO frame of {len(p)} bytes, at most {MAX_VIDEO_BYTES}")
        if not any(p.startswith(m) for m in IMAGE_MAGIC):
            raise ProtocolError("bad_payload", "VIDEO payload must be one JPEG or PNG image")
        return Frame(kind, p)
    if kind == Kind.TEXT:
        if len(p) > MAX_TEXT_BYTES:
            raise ProtocolError("oversized", f"TEXT of {len(p)} bytes, at most {MAX_TEXT_BYTES}: split it")
        return Frame(kind, _utf8(kind, p))
    if kind in (Kind.PING, Kind.PONG):
        if len(p) > MAX_PING_BYTES:
            raise ProtocolError("oversized", f"{kind.name} of {len(p)} bytes, at most {MAX_PING_BYTES}")
        return Frame(kind, p)
    if kind in (Kind.MODEL_AUDIO, Kind.MODEL_TEXT):
        if len(p) < 4 or (kind == Kind.MODEL_AUDIO and len(p) % 2):
            raise ProtocolError("bad_length", f"{kind.name} needs a uint32 micro-turn index then its payload")
        mt = struct.unpack("<I", p[:4])[0]
        return Frame(kind, (mt, pcm16_to_float(p[4:]) if kind == Kind.MODEL_AUDIO else _utf8(kind, p[4:])))
    obj = _json(kind, p)
    if kind == Kind.HANDSHAKE:
        if obj.get("version") != VERSION:
            raise ProtocolError("version", f"handshake version {obj.get('version')!r}: this server speaks protocol "
                                           f"version {VERSION}; send {{\"version\": {VERSION}}}")
        for key, typ in (("seed", int), ("context", str), ("token", str), ("temperature", (int, float)),
                         ("top_p", (int, float))):
            if key in obj and (not isinstance(obj[key], typ) or isinstance(obj[key], bool)):
                raise ProtocolError("bad_payload", f"handshake {key!r} has the wrong type {type(obj[key]).__name__}")
    if kind == Kind.CONTROL:
        action = obj.get("action")
        if action not in CONTROL_ACTIONS:
            raise ProtocolError("bad_payload", f"CONTROL action {action!r}: one of {', '.join(CONTROL_ACTIONS)}")
        if action == "rollback" and (not isinstance(obj.get("micro_turn"), int) or isinstance(obj["micro_turn"], bool)):
            raise ProtocolError("bad_payload", "CONTROL rollback needs an integer \"micro_turn\"")
        if action == "open" and not isinstance(obj.get("seed", 0), int):
            raise ProtocolError("bad_payload", "CONTROL open: \"seed\" must be an integer")
    return Frame(kind, obj)


def encode(kind: Kind, value=b"", micro_turn: int = 0) -> bytes:
    """Build a frame: dict → JSON kinds; str → TEXT/MODEL_TEXT; float array → AUDIO /
    MODEL_AUDIO (PCM16); bytes as they are. MODEL_* frames carry ``micro_turn``."""
    kind = Kind(kind)
    if isinstance(value, dict):
        body = json.dumps(value, separators=(",", ":")).encode()
    elif isinstance(value, str):
        body = value.encode("utf-8")
    elif isinstance(value, np.ndarray):
        body = float_to_pcm16(value)
    else:
        body = bytes(value)
    if kind in (Kind.MODEL_AUDIO, Kind.MODEL_TEXT):
        body = struct.pack("<I", micro_turn) + body
    return bytes([kind]) + body


def error(code: str, message: str) -> bytes:
    return encode(Kind.ERROR, {"code": code, "message": message})


def logprob_hex(logprobs: np.ndarray) -> str:
    """float32 log-probs → hex of their raw bits (little-endian), for the TICK frame."""
    return np.asarray(logprobs, "<f4").tobytes().hex()


def logprob_bits(hex_str: str) -> np.ndarray:
    """The TICK frame's ``logprobs`` → uint32 [n] raw bits."""
    return np.frombuffer(bytes.fromhex(hex_str), "<u4")
