"""The wire protocol: every frame kind round-trips, every malformed frame is a ProtocolError
with its code and a message saying what to send."""

import json

import numpy as np
import pytest

from tml.serve import protocol as P
from tml.serve.protocol import Kind, ProtocolError


def test_client_frames_round_trip():
    x = P.pcm16_to_float(P.float_to_pcm16(np.linspace(-1, 1, P.CHUNK_SAMPLES)))
    f = P.decode(P.encode(Kind.AUDIO, x))
    assert f.kind == Kind.AUDIO and f.value.dtype == np.float32
    assert np.array_equal(f.value.view(np.uint32), x.view(np.uint32))   # PCM16-exact samples come back bit for bit
    assert P.decode(P.encode(Kind.TEXT, "héllo")).value == "héllo"
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 10
    assert P.decode(P.encode(Kind.VIDEO, png)).value == png
    hs = {"version": 1, "seed": 3, "context": "be brief", "temperature": 0.5}
    assert P.decode(P.encode(Kind.HANDSHAKE, hs)).value == hs
    for ctl in ({"action": "open", "seed": 2}, {"action": "close"}, {"action": "cancel"},
                {"action": "rollback", "micro_turn": 4}):
        assert P.decode(P.encode(Kind.CONTROL, ctl)).value == ctl
    assert P.decode(P.encode(Kind.PING, b"abc")).value == b"abc"


def test_server_frames_round_trip():
    w = np.linspace(-0.5, 0.5, 3200, dtype=np.float32)
    mt, back = P.decode(P.encode(Kind.MODEL_AUDIO, w, micro_turn=7), sender="server").value
    assert mt == 7 and np.abs(back - w).max() <= 0.5 / 32768
    assert P.decode(P.encode(Kind.MODEL_TEXT, "ok", micro_turn=2), sender="server").value == (2, "ok")
    lp = np.array([-0.1, -2.5, np.float32(-1e-8)], np.float32)
    tick = P.decode(P.encode(Kind.TICK, {"micro_turn": 1, "logprobs": P.logprob_hex(lp)}), sender="server").value
    assert np.array_equal(P.logprob_bits(tick["logprobs"]), lp.view(np.uint32))
    assert P.decode(P.error("x", "y"), sender="server").value == {"code": "x", "message": "y"}


@pytest.mark.parametrize("data, code, words", [
    (b"", "empty", "kind byte"),
    (b"\x7f123", "unknown_kind", "0x7f"),
    (bytes([Kind.MODEL_TEXT]) + b"\0\0\0\0hi", "wrong_direction", "server frame"),
    (bytes([Kind.AUDIO]) + b"\0" * 6398, "bad_length", "6400 bytes"),
    (bytes([Kind.AUDIO]) + b"\0" * 6401, "bad_length", "3200 PCM16"),
    (bytes([Kind.VIDEO]) + b"GIF89a", "bad_payload", "JPEG or PNG"),
    (bytes([Kind.VIDEO]) + b"\xff\xd8\xff" + b"\0" * P.MAX_VIDEO_BYTES, "oversized", "at most"),
    (bytes([Kind.TEXT]) + b"\xff\xfe", "bad_payload", "UTF-8"),
    (bytes([Kind.TEXT]) + b"a" * (P.MAX_TEXT_BYTES + 1), "oversized", "split it"),
    (bytes([Kind.HANDSHAKE]) + b"{not json", "bad_payload", "JSON object"),
    (bytes([Kind.HANDSHAKE]) + b"[1]", "bad_payload", "JSON object"),
    (bytes([Kind.HANDSHAKE]) + json.dumps({"version": 2}).encode(), "version", "version 1"),
    (bytes([Kind.HANDSHAKE]) + json.dumps({"version": 1, "seed": "x"}).encode(), "bad_payload", "'seed'"),
    (bytes([Kind.CONTROL]) + json.dumps({"action": "jump"}).encode(), "bad_payload", "rollback"),
    (bytes([Kind.CONTROL]) + json.dumps({"action": "rollback"}).encode(), "bad_payload", "micro_turn"),
    (bytes([Kind.PING]) + b"p" * 65, "oversized", "at most 64"),
])
def test_malformed_frames_are_protocol_errors(data, code, words):
    with pytest.raises(ProtocolError, match=words) as e:
        P.decode(data, sender="client")
    assert e.value.code == code


def test_message_limit_is_checked_first():
    with pytest.raises(ProtocolError, match="limit of 100 bytes") as e:
        P.decode(bytes([Kind.TEXT]) + b"a" * 200, max_bytes=100)
    assert e.value.code == "oversized"
    assert P.decode(bytes([Kind.TEXT]) + b"a" * 99, max_bytes=100).value == "a" * 99


def test_pcm16_is_clipped_and_rounded():
    b = P.float_to_pcm16(np.array([2.0, -2.0, 1.4 / 32768, 0.0]))
    assert np.frombuffer(b, "<i2").tolist() == [32767, -32768, 1, 0]
