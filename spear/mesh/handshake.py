"""Link authentication, sans-I/O: a mutual HMAC challenge, per-link session MACs, join tokens.

Every mesh connection starts with four frames (initiator A dials responder B; K is the
cluster key, `t` the transcript: the version and every field of Hello and Challenge)::

    A -> B  Hello      versions A speaks, A's node id, listen address, frame cap, nonce_a
    B -> A  Challenge  chosen version, B's node id, frame cap, nonce_b, HMAC(K, "responder" | t)
    A -> B  Proof      HMAC(K, "initiator" | t)
    B -> A  Welcome    (or Refused with a reason, then B closes; A likewise answers a bad
                       Challenge with Refused, so both sides log why)

Each side proves it knows K without revealing it, and both proofs bind both node ids and both
fresh nonces, so a recorded handshake replayed later (or reflected back) fails: the other side's
nonce is new. Both sides then derive a per-link session key HMAC(K, "session" | t) and from it
one key per direction. After the handshake every frame is `mac[16] | kind[1] | payload`, where
mac = HMAC-SHA256(direction key, seq | kind | payload) truncated to 16 bytes and `seq` is an
implicit per-direction counter (never sent). A frame that is injected, altered, replayed,
dropped from the middle or reordered fails its MAC, and the link is closed. Each side also
learns the other's frame cap, so that an honest node never sends a frame its peer would refuse.

What this protects against: peers without the cluster key (they cannot join, and nothing they
send is delivered), injection or tampering of frames on a link, replay of old handshakes or
frames. What it does not: eavesdropping (there is no encryption; TLS is out of scope, run the
mesh on a trusted network or a VPN), a node that holds the key claiming another node's id (the
key proves cluster membership, not identity), or denial of service (anyone can open TCP
connections and waste a handshake's worth of work).

Join tokens carry the cluster key: "spear1-" + lower-case base32 (no padding) of the 32-byte
key followed by a 4-byte checksum, so a mistyped token is refused before any connection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass

from spear.errors import ConfigError, WireError
from spear.mesh.codec import MessageCodec

PROTOCOL_VERSIONS = (1, 1)  # (lowest, highest) this node speaks
KEY_BYTES = 32
NONCE_BYTES = 32
MAC_BYTES = 16
HANDSHAKE_MAX_BYTES = 4096
TOKEN_PREFIX = "spear1-"
_CHECKSUM_BYTES = 4
_SEQ_KIND = struct.Struct(">QB")


class AuthenticationError(WireError):
    """A peer failed the handshake or sent a frame whose MAC does not verify."""

    code = "unauthenticated"


class JoinTokenError(ConfigError):
    """A join token is malformed or its checksum does not match."""

    code = "bad_join_token"


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    min_version: int
    max_version: int
    node_id: str
    address: str
    nonce: bytes
    max_frame_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Challenge:
    version: int
    node_id: str
    nonce: bytes
    max_frame_bytes: int
    proof: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Proof:
    proof: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    reason: str


HANDSHAKE_MESSAGES: dict[str, type[object]] = {
    "mesh.hello": Hello,
    "mesh.challenge": Challenge,
    "mesh.proof": Proof,
    "mesh.welcome": Welcome,
    "mesh.refused": Refused,
}
HANDSHAKE_CODEC = MessageCodec(HANDSHAKE_MESSAGES)


def new_cluster_key() -> bytes:
    """A fresh random cluster key (32 bytes from the OS CSPRNG)."""
    return secrets.token_bytes(KEY_BYTES)


def join_token(key: bytes) -> str:
    """The join token that carries `key`."""
    _check_key(key)
    raw = key + hashlib.sha256(b"spear join token" + key).digest()[:_CHECKSUM_BYTES]
    return TOKEN_PREFIX + base64.b32encode(raw).decode().rstrip("=").lower()


def parse_join_token(token: str) -> bytes:
    """The cluster key inside a join token; raise JoinTokenError naming what is wrong."""
    text = token.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise JoinTokenError(
            f"mesh.join_token must start with {TOKEN_PREFIX!r}; copy it from the first node's"
            " <data-dir>/join-token"
        )
    body = text[len(TOKEN_PREFIX) :].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise JoinTokenError("mesh.join_token is not valid base32 after 'spear1-'") from exc
    if len(raw) != KEY_BYTES + _CHECKSUM_BYTES:
        raise JoinTokenError(
            f"mesh.join_token must carry {KEY_BYTES + _CHECKSUM_BYTES} bytes, got {len(raw)}"
        )
    key, checksum = raw[:KEY_BYTES], raw[KEY_BYTES:]
    if not hmac.compare_digest(join_token(key), TOKEN_PREFIX + body.lower()):
        raise JoinTokenError(f"mesh.join_token checksum {checksum.hex()} does not match; mistyped?")
    return key


def _check_key(key: bytes) -> None:
    if len(key) < 16:
        raise ConfigError(f"the cluster key must be at least 16 bytes, got {len(key)}")


def _mac(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(struct.pack(">I", len(part)) + part)  # length-prefixed: no ambiguity
    return mac.digest()


def _transcript(version: int, hello: Hello, responder: str, nonce_b: bytes, cap_b: int) -> bytes:
    """Everything both sides said: the proofs and the session key bind all of it."""
    return _mac(
        b"spear mesh transcript",
        str(version).encode(),
        hello.node_id.encode(),
        hello.address.encode(),
        hello.nonce,
        str(hello.max_frame_bytes).encode(),
        responder.encode(),
        nonce_b,
        str(cap_b).encode(),
    )


class Session:
    """The authenticated state of one link: seals outgoing frames and opens incoming ones.

    Not thread-safe; one writer seals and one reader opens, in the order frames go on the wire.
    """

    def __init__(
        self,
        *,
        send_key: bytes,
        receive_key: bytes,
        peer_id: str,
        peer_address: str,
        peer_max_frame_bytes: int,
    ) -> None:
        self.peer_id = peer_id
        #: the address the peer listens on (what it said in its hello, or what we dialled)
        self.peer_address = peer_address
        #: the largest payload the peer accepts; larger frames must not be sent to it
        self.peer_max_frame_bytes = peer_max_frame_bytes
        self._send_key = send_key
        self._receive_key = receive_key
        self._send_seq = 0
        self._receive_seq = 0

    def seal(self, kind: int, payload: bytes) -> bytes:
        """The frame carrying `payload` of `kind` (0..255): mac | kind | payload."""
        head = _SEQ_KIND.pack(self._send_seq, kind)
        self._send_seq += 1
        mac = hmac.new(self._send_key, head + payload, hashlib.sha256).digest()[:MAC_BYTES]
        return mac + head[-1:] + payload

    def open(self, frame: bytes) -> tuple[int, bytes]:
        """Verify a received frame; return (kind, payload) or raise AuthenticationError."""
        if len(frame) < MAC_BYTES + 1:
            raise AuthenticationError(f"frame of {len(frame)} bytes is shorter than its header")
        mac, kind, payload = frame[:MAC_BYTES], frame[MAC_BYTES], frame[MAC_BYTES + 1 :]
        head = _SEQ_KIND.pack(self._receive_seq, kind)
        expected = hmac.new(self._receive_key, head + payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected[:MAC_BYTES]):
            raise AuthenticationError(
                f"frame {self._receive_seq} from {self.peer_id} has a bad MAC (injected or altered)"
            )
        self._receive_seq += 1
        return kind, payload


def _session(
    key: bytes, transcript: bytes, *, initiator: bool, peer_id: str, peer_address: str, cap: int
) -> Session:
    session_key = _mac(key, b"session", transcript)
    a_to_b, b_to_a = _mac(session_key, b"a->b"), _mac(session_key, b"b->a")
    send, receive = (a_to_b, b_to_a) if initiator else (b_to_a, a_to_b)
    return Session(
        send_key=send,
        receive_key=receive,
        peer_id=peer_id,
        peer_address=peer_address,
        peer_max_frame_bytes=cap,
    )


def _decode(data: bytes, expected: type[object]) -> object:
    message = HANDSHAKE_CODEC.decode(data, max_bytes=HANDSHAKE_MAX_BYTES).message
    if isinstance(message, Refused):
        raise AuthenticationError(f"the peer refused the link: {message.reason}")
    if not isinstance(message, expected):
        raise AuthenticationError(f"expected {expected.__name__}, got {type(message).__name__}")
    return message


def _check_nonce(nonce: bytes, who: str) -> None:
    if len(nonce) != NONCE_BYTES:
        raise AuthenticationError(f"{who} nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")


def _check_peer(peer_id: str, own_id: str, nonce: bytes) -> None:
    if peer_id == own_id or not peer_id:
        raise AuthenticationError(f"peer claims node id {peer_id!r}, which is ours or empty")
    _check_nonce(nonce, "the peer's")


class InitiatorHandshake:
    """The dialling side: `hello()`, then `on_challenge(frame)`, then `on_welcome(frame)`.

    Args:
        key: the cluster key.
        node_id: this node's id.
        address: the mesh address this node listens on (tells the peer how to reach it back).
        nonce: NONCE_BYTES fresh random bytes (the driver passes `secrets.token_bytes`).
        max_frame_bytes: the largest frame payload this node accepts (told to the peer).
    """

    def __init__(
        self, *, key: bytes, node_id: str, address: str, nonce: bytes, max_frame_bytes: int
    ) -> None:
        _check_key(key)
        _check_nonce(nonce, "our")
        lo, hi = PROTOCOL_VERSIONS
        self._key = key
        self._hello = Hello(
            min_version=lo,
            max_version=hi,
            node_id=node_id,
            address=address,
            nonce=nonce,
            max_frame_bytes=max_frame_bytes,
        )
        self._transcript = b""
        self._challenge: Challenge | None = None

    def hello(self) -> bytes:
        """The first frame to send."""
        return HANDSHAKE_CODEC.encode(self._hello)

    def on_challenge(self, data: bytes) -> bytes:
        """Check the responder's proof; return our Proof frame. AuthenticationError if bad."""
        challenge = _decode(data, Challenge)
        assert isinstance(challenge, Challenge)
        lo, hi = PROTOCOL_VERSIONS
        if not lo <= challenge.version <= hi:
            raise AuthenticationError(
                f"peer chose protocol version {challenge.version}, this node speaks {lo}..{hi}"
            )
        _check_peer(challenge.node_id, self._hello.node_id, challenge.nonce)
        t = _transcript(
            challenge.version,
            self._hello,
            challenge.node_id,
            challenge.nonce,
            challenge.max_frame_bytes,
        )
        if not hmac.compare_digest(challenge.proof, _mac(self._key, b"responder", t)):
            raise AuthenticationError(
                f"node {challenge.node_id!r} does not prove the cluster key (wrong join token?)"
            )
        self._transcript, self._challenge = t, challenge
        return HANDSHAKE_CODEC.encode(Proof(proof=_mac(self._key, b"initiator", t)))

    def on_welcome(self, data: bytes, *, peer_address: str) -> Session:
        """The link's session once the responder accepted our proof."""
        if self._challenge is None:
            raise AuthenticationError("welcome received before the challenge")
        _decode(data, Welcome)
        return _session(
            self._key,
            self._transcript,
            initiator=True,
            peer_id=self._challenge.node_id,
            peer_address=peer_address,
            cap=self._challenge.max_frame_bytes,
        )


class ResponderHandshake:
    """The accepting side: `on_hello(frame)` -> Challenge, `on_proof(frame)` -> Welcome + Session.

    On AuthenticationError the driver sends `refusal(reason)` and closes the connection.
    """

    def __init__(self, *, key: bytes, node_id: str, nonce: bytes, max_frame_bytes: int) -> None:
        _check_key(key)
        _check_nonce(nonce, "our")
        self._key, self._node_id, self._nonce = key, node_id, nonce
        self._max_frame_bytes = max_frame_bytes
        self._transcript = b""
        self._hello: Hello | None = None

    def on_hello(self, data: bytes) -> bytes:
        """Check the initiator's hello; return the Challenge frame."""
        hello = _decode(data, Hello)
        assert isinstance(hello, Hello)
        lo, hi = PROTOCOL_VERSIONS
        version = min(hi, hello.max_version)
        if version < max(lo, hello.min_version):
            raise AuthenticationError(
                f"peer speaks protocol versions {hello.min_version}..{hello.max_version},"
                f" this node speaks {lo}..{hi}; upgrade the older node"
            )
        _check_peer(hello.node_id, self._node_id, hello.nonce)
        t = _transcript(version, hello, self._node_id, self._nonce, self._max_frame_bytes)
        self._transcript, self._hello = t, hello
        challenge = Challenge(
            version=version,
            node_id=self._node_id,
            nonce=self._nonce,
            max_frame_bytes=self._max_frame_bytes,
            proof=_mac(self._key, b"responder", t),
        )
        return HANDSHAKE_CODEC.encode(challenge)

    def on_proof(self, data: bytes) -> tuple[bytes, Session]:
        """Check the initiator's proof; return the Welcome frame and the link's session."""
        if self._hello is None:
            raise AuthenticationError("proof received before the hello")
        proof = _decode(data, Proof)
        assert isinstance(proof, Proof)
        if not hmac.compare_digest(proof.proof, _mac(self._key, b"initiator", self._transcript)):
            raise AuthenticationError(
                f"node {self._hello.node_id!r} does not prove the cluster key"
                " (wrong join token, or a replayed handshake)"
            )
        session = _session(
            self._key,
            self._transcript,
            initiator=False,
            peer_id=self._hello.node_id,
            peer_address=self._hello.address,
            cap=self._hello.max_frame_bytes,
        )
        return HANDSHAKE_CODEC.encode(Welcome()), session

    @staticmethod
    def refusal(reason: str) -> bytes:
        """The frame telling the initiator why it is refused."""
        return HANDSHAKE_CODEC.encode(Refused(reason=reason[:200]))
