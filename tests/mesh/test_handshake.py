"""The mesh handshake (pure): mutual proof of the cluster key, sessions, MACs, join tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.errors import ConfigError, WireError
from spear.mesh import handshake as hs
from spear.mesh.handshake import (
    AuthenticationError,
    InitiatorHandshake,
    JoinTokenError,
    ResponderHandshake,
    Session,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CAP_A, CAP_B = 4096, 8192


def nonce(n: int) -> bytes:
    return bytes([n]) * hs.NONCE_BYTES


def run(
    a_key: bytes = KEY, b_key: bytes = KEY, *, a_nonce: int = 1, b_nonce: int = 2
) -> tuple[Session, Session]:
    """A complete handshake between initiator "a" and responder "b"."""
    a = InitiatorHandshake(
        key=a_key, node_id="a", address="10.0.0.1:7946", nonce=nonce(a_nonce), max_frame_bytes=CAP_A
    )
    b = ResponderHandshake(key=b_key, node_id="b", nonce=nonce(b_nonce), max_frame_bytes=CAP_B)
    proof = a.on_challenge(b.on_hello(a.hello()))
    welcome, b_session = b.on_proof(proof)
    return a.on_welcome(welcome, peer_address="10.0.0.2:7946"), b_session


def test_both_sides_learn_the_peer_and_share_directional_keys() -> None:
    a, b = run()
    assert (a.peer_id, b.peer_id) == ("b", "a")
    assert b.peer_address == "10.0.0.1:7946"
    assert (a.peer_max_frame_bytes, b.peer_max_frame_bytes) == (CAP_B, CAP_A)
    for kind, payload in [(0, b"hello"), (3, b""), (6, b"x" * 1000)]:
        assert b.open(a.seal(kind, payload)) == (kind, payload)
        assert a.open(b.seal(kind, payload)) == (kind, payload)


def test_a_responder_without_the_key_is_refused_by_the_initiator() -> None:
    with pytest.raises(AuthenticationError, match="does not prove the cluster key"):
        run(b_key=OTHER_KEY)


def test_an_initiator_without_the_key_is_refused_by_the_responder() -> None:
    a = InitiatorHandshake(
        key=OTHER_KEY, node_id="a", address="", nonce=nonce(1), max_frame_bytes=CAP_A
    )
    b = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(2), max_frame_bytes=CAP_B)
    challenge = b.on_hello(a.hello())
    # the initiator notices first (the responder's proof is made with the real key) ...
    with pytest.raises(AuthenticationError):
        a.on_challenge(challenge)
    # ... and a proof forged without the key is refused by the responder
    forged = hs.HANDSHAKE_CODEC.encode(hs.Proof(proof=b"\0" * 32))
    with pytest.raises(AuthenticationError, match="does not prove the cluster key"):
        b.on_proof(forged)


def test_a_replayed_proof_is_refused_because_the_responder_nonce_is_new() -> None:
    a = InitiatorHandshake(key=KEY, node_id="a", address="", nonce=nonce(1), max_frame_bytes=CAP_A)
    b1 = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(2), max_frame_bytes=CAP_B)
    hello = a.hello()
    recorded_proof = a.on_challenge(b1.on_hello(hello))
    b1.on_proof(recorded_proof)
    # an eavesdropper replays the recorded hello and proof to a fresh responder
    b2 = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(3), max_frame_bytes=CAP_B)
    b2.on_hello(hello)
    with pytest.raises(AuthenticationError, match="replayed handshake"):
        b2.on_proof(recorded_proof)


def test_a_challenge_reflected_back_does_not_pass_as_a_proof() -> None:
    a = InitiatorHandshake(key=KEY, node_id="a", address="", nonce=nonce(1), max_frame_bytes=CAP_A)
    b = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(2), max_frame_bytes=CAP_B)
    challenge = hs.HANDSHAKE_CODEC.decode(b.on_hello(a.hello())).message
    reflected = hs.HANDSHAKE_CODEC.encode(hs.Proof(proof=challenge.proof))
    with pytest.raises(AuthenticationError):
        b.on_proof(reflected)


def test_incompatible_protocol_versions_are_refused() -> None:
    b = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(2), max_frame_bytes=CAP_B)
    hello = hs.Hello(
        min_version=7, max_version=9, node_id="a", address="", nonce=nonce(1), max_frame_bytes=1
    )
    with pytest.raises(AuthenticationError, match=r"versions 7\.\.9, this node speaks 1\.\.1"):
        b.on_hello(hs.HANDSHAKE_CODEC.encode(hello))


def test_connecting_to_yourself_is_refused() -> None:
    a = InitiatorHandshake(key=KEY, node_id="b", address="", nonce=nonce(1), max_frame_bytes=CAP_A)
    b = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(2), max_frame_bytes=CAP_B)
    with pytest.raises(AuthenticationError, match="which is ours or empty"):
        b.on_hello(a.hello())


def test_messages_out_of_order_and_refusals_are_authentication_errors() -> None:
    a = InitiatorHandshake(key=KEY, node_id="a", address="", nonce=nonce(1), max_frame_bytes=CAP_A)
    b = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(2), max_frame_bytes=CAP_B)
    with pytest.raises(AuthenticationError, match="before the hello"):
        b.on_proof(hs.HANDSHAKE_CODEC.encode(hs.Proof(proof=b"")))
    with pytest.raises(AuthenticationError, match="expected Challenge, got Hello"):
        a.on_challenge(a.hello())
    with pytest.raises(AuthenticationError, match="refused the link: go away"):
        a.on_challenge(ResponderHandshake.refusal("go away"))


@given(st.binary(max_size=300))
def test_garbage_handshake_frames_raise_only_wire_errors(data: bytes) -> None:
    b = ResponderHandshake(key=KEY, node_id="b", nonce=nonce(2), max_frame_bytes=CAP_B)
    with pytest.raises(WireError):
        b.on_hello(data)


def test_injected_altered_replayed_or_reordered_frames_fail_their_mac() -> None:
    a, b = run()
    first, second = a.seal(0, b"one"), a.seal(0, b"two")
    with pytest.raises(AuthenticationError, match="bad MAC"):
        b.open(second)  # reordered: the sequence number is implicit
    assert b.open(first) == (0, b"one")
    with pytest.raises(AuthenticationError):
        b.open(first)  # replayed
    altered = second[:-1] + bytes([second[-1] ^ 1])
    with pytest.raises(AuthenticationError):
        b.open(altered)
    with pytest.raises(AuthenticationError, match="shorter than its header"):
        b.open(b"short")
    assert b.open(second) == (0, b"two")


@given(st.binary(max_size=100))
def test_random_frames_never_open(frame: bytes) -> None:
    _a, b = run()
    with pytest.raises(AuthenticationError):
        b.open(frame)


def test_frames_of_another_session_do_not_open() -> None:
    a1, _b1 = run(a_nonce=1, b_nonce=2)
    _a2, b2 = run(a_nonce=3, b_nonce=4)
    with pytest.raises(AuthenticationError):
        b2.open(a1.seal(0, b"from the old link"))


def test_a_frame_does_not_open_in_its_own_direction() -> None:
    a, _b = run()
    with pytest.raises(AuthenticationError):
        a.open(a.seal(0, b"reflected"))


def test_join_token_round_trip() -> None:
    key = hs.new_cluster_key()
    token = hs.join_token(key)
    assert token.startswith("spear1-") and token == token.lower()
    assert hs.parse_join_token(token) == key
    assert hs.parse_join_token(f"  {token.upper().replace('SPEAR1-', 'spear1-')}\n") == key
    assert hs.new_cluster_key() != key


@pytest.mark.parametrize(
    ("token", "rule"),
    [
        ("abc", "must start with 'spear1-'"),
        ("spear1-!!!!", "not valid base32"),
        ("spear1-aaaa", "must carry 36 bytes"),
    ],
)
def test_malformed_join_tokens_name_the_rule(token: str, rule: str) -> None:
    with pytest.raises(JoinTokenError, match=rule):
        hs.parse_join_token(token)


def test_a_mistyped_join_token_fails_its_checksum() -> None:
    token = hs.join_token(KEY)
    i = len("spear1-") + 3
    mistyped = token[:i] + ("b" if token[i] != "b" else "c") + token[i + 1 :]
    with pytest.raises(JoinTokenError, match="checksum"):
        hs.parse_join_token(mistyped)
    assert issubclass(JoinTokenError, ConfigError)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes, got 4"):
        hs.join_token(b"abcd")
