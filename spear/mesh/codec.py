"""The mesh message codec: frozen dataclass messages <-> CBOR envelopes, validated strictly.

API (used by the transport, the simulator and tests)::

    codec = MessageCodec({**RAFT_MESSAGES, **SWIM_MESSAGES})   # tag -> dataclass, append-only
    data = codec.encode(message, id=0, sender="n1")            # bytes (spear.wire envelope)
    decoded = codec.decode(data, max_bytes=...)                # Decoded(message, id, sender)
    body = codec.to_body(message); codec.from_body(tag, body)  # the envelope body alone
    codec.tag_of(message); tag in codec; codec.extended(MORE_MESSAGES)

A message is a dataclass registered under a string tag. The tag is the envelope's `type`; the
fields are the envelope's `body`. Field types may be int, float, str, bytes, bool, None,
`NewType`s, `Literal`s, enums (sent by value), `tuple[X, ...]` and fixed tuples, `Mapping[str,
X]` / `dict[str, X]`, unions of those, and nested dataclasses. A nested instance of a
registered class carries its tag under the key `"$t"`, which is how a union of message classes
(`tuple[Alive | Suspect | Dead, ...]`) is decoded; a nested unregistered dataclass is allowed
only where the declared type names it alone.

Decoding never trusts the peer: every field is checked against its declared type (no
coercion, except that an int is accepted where a float is declared), missing required fields
and unknown tags are refused, and every failure is a WireError naming the tag and field path;
never a TypeError or KeyError from inside. Unknown extra keys are ignored so that a newer
peer may add fields (forward compatibility). Field types are compiled when the codec is built,
so an unsupported annotation fails at start-up, not on the first message.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spear import wire
from spear.errors import WireError

NESTED_TAG_KEY = "$t"
_UNIONS = (typing.Union, types.UnionType)

#: converts one decoded CBOR value at a field path into the declared Python value
#: (the path is built only when an error names it: a str, or (parent path, key or index))
_Decoder = Callable[[Any, Any], Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decoded:
    """One decoded envelope: the message and the envelope's correlation id and sender."""

    message: Any
    id: int
    sender: str


class UnknownMessageError(WireError):
    """A well-formed envelope of a message type this codec does not know (a newer node's).

    Carries the envelope's tag, id and sender, so that a receiver can answer such a request
    ("unsupported") rather than give up the link: rolling upgrades meet it.
    """

    def __init__(self, tag: str, *, id: int = 0, sender: str = "") -> None:
        super().__init__(f"unknown message type {tag!r}")
        self.tag = tag
        self.id = id
        self.sender = sender


class MessageCodec:
    """Encodes registered dataclass messages into spear.wire envelopes and back.

    Args:
        registry: wire tag -> dataclass. Tags are append-only: never reuse or rename one.

    Raises:
        TypeError: a registry entry is not a dataclass, is registered twice, or has a field
            whose annotation the codec cannot carry (a programming error, found at start-up).
    """

    def __init__(self, registry: Mapping[str, type[Any]]) -> None:
        self._by_tag: dict[str, type[Any]] = dict(registry)
        self._by_class: dict[type[Any], str] = {}
        for tag, cls in self._by_tag.items():
            if not isinstance(tag, str) or not tag:
                raise TypeError(f"message tag must be a non-empty string, got {tag!r}")
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise TypeError(f"message {tag!r} must be a dataclass class, got {cls!r}")
            if cls in self._by_class:
                raise TypeError(f"{cls.__name__} is registered twice ({self._by_class[cls]!r})")
            self._by_class[cls] = tag
        self._decoders: dict[type[Any], _Decoder] = {}
        #: per class: (field name, whether its value goes on the wire as it is)
        self._plans: dict[type[Any], list[tuple[str, bool]]] = {}
        for cls in self._by_tag.values():
            self._dataclass_decoder(cls)

    @property
    def registry(self) -> Mapping[str, type[Any]]:
        """The tag -> class mapping this codec was built from."""
        return types.MappingProxyType(self._by_tag)

    def __contains__(self, tag: object) -> bool:
        return tag in self._by_tag

    def extended(self, extra: Mapping[str, type[Any]]) -> MessageCodec:
        """A codec that also knows `extra`; a tag already taken raises TypeError."""
        clash = sorted(set(extra) & set(self._by_tag))
        if clash:
            raise TypeError(f"message tags registered twice: {', '.join(clash)}")
        return MessageCodec({**self._by_tag, **extra})

    def tag_of(self, message: object) -> str:
        """The wire tag of a message; raise WireError if its class is not registered."""
        tag = self._by_class.get(type(message))
        if tag is None:
            raise WireError(f"{type(message).__name__} is not a registered mesh message")
        return tag

    # -- encoding -------------------------------------------------------------------------

    def to_body(self, message: object) -> dict[str, Any]:
        """The envelope body of a registered message: its fields as CBOR-ready values."""
        self.tag_of(message)
        return self._fields(message)

    def encode(self, message: object, *, id: int = 0, sender: str = "") -> bytes:
        """Encode a registered message as one envelope (CBOR bytes)."""
        env = wire.Envelope(
            type=self.tag_of(message), id=id, sender=sender, body=self._fields(message)
        )
        return wire.encode_envelope(env)

    def _fields(self, obj: Any) -> dict[str, Any]:
        plan = self._plans.get(type(obj))
        if plan is None:
            plan = self._plans[type(obj)] = _encoding_plan(type(obj))
        value = self._value
        return {
            name: (getattr(obj, name) if plain else value(getattr(obj, name)))
            for name, plain in plan
        }

    def _value(self, value: Any) -> Any:
        if type(value) in _PLAIN:
            return value
        if isinstance(value, tuple | list):
            return [self._value(v) for v in value]
        if isinstance(value, enum.Enum):
            return self._value(value.value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            doc = self._fields(value)
            tag = self._by_class.get(type(value))
            if tag is not None:
                doc[NESTED_TAG_KEY] = tag
            return doc
        if isinstance(value, Mapping):
            return {k: self._value(v) for k, v in value.items()}
        return value

    # -- decoding -------------------------------------------------------------------------

    def decode(self, data: bytes, *, max_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> Decoded:
        """Decode one envelope into its message; raise WireError for anything malformed."""
        env = wire.decode_envelope(data, max_bytes=max_bytes)
        if env.type not in self._by_tag:
            raise UnknownMessageError(env.type, id=env.id, sender=env.sender)
        return Decoded(message=self.from_body(env.type, env.body), id=env.id, sender=env.sender)

    def from_body(self, tag: str, body: Any) -> Any:
        """Build the message registered under `tag` from an envelope body; WireError if bad."""
        cls = self._by_tag.get(tag)
        if cls is None:
            raise UnknownMessageError(tag)
        return self._decoders[cls](body, tag)

    def _compile(self, hint: Any) -> _Decoder:
        """A decoder for one annotation; TypeError if the codec cannot carry it."""
        origin = typing.get_origin(hint)
        if hint is Any or hint is object:
            raise TypeError("message fields must have a concrete type, not Any")
        if hint is None or hint is type(None):
            return _exact(type(None), "null")
        if hint in _SCALARS:
            return _SCALARS[hint]
        if isinstance(hint, typing.NewType):
            return self._compile(hint.__supertype__)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return _enum_decoder(hint)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self._dataclass_decoder(hint)
        if origin is typing.Literal:
            return _literal_decoder(typing.get_args(hint))
        if origin in _UNIONS:
            return self._union_decoder(typing.get_args(hint))
        if origin is tuple:
            return self._tuple_decoder(typing.get_args(hint))
        if origin in (dict, Mapping, typing.Mapping):
            key, val = typing.get_args(hint)
            if key is not str:
                raise TypeError(f"mapping keys must be str, got {key!r}")
            return _mapping_decoder(self._compile(val))
        raise TypeError(f"the mesh codec cannot carry fields of type {hint!r}")

    def _dataclass_decoder(self, cls: type[Any]) -> _Decoder:
        known = self._decoders.get(cls)
        if known is not None:
            return known
        fields: list[tuple[str, _Decoder | None, bool]] = []

        def decode(value: Any, path: Any) -> Any:
            if not isinstance(value, dict):
                raise WireError(f"{_fmt(path)} must be a map, got {_kind(value)}")
            kwargs = {}
            for name, field_decoder, required in fields:
                if name in value:
                    assert field_decoder is not None
                    kwargs[name] = field_decoder(value[name], (path, name))
                elif required:
                    raise WireError(f"{_fmt(path)}.{name} is missing")
            try:
                return cls(**kwargs)
            except (TypeError, ValueError) as exc:  # a __post_init__ rule of the message
                raise WireError(f"{_fmt(path)} is not a valid {cls.__name__}: {exc}") from exc

        # Registered before compiling the fields, so a self-referencing message compiles.
        self._decoders[cls] = decode
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            fields.append((f.name, self._compile(hints[f.name]), required))
        return decode

    def _union_decoder(self, members: tuple[Any, ...]) -> _Decoder:
        tagged: dict[str, _Decoder] = {}
        others: list[_Decoder] = []
        for member in members:
            tag = self._by_class.get(member) if isinstance(member, type) else None
            if tag is not None:
                tagged[tag] = self._compile(member)
            else:
                others.append(self._compile(member))

        def decode(value: Any, path: Any) -> Any:
            if isinstance(value, dict) and tagged:
                tag = value.get(NESTED_TAG_KEY)
                if isinstance(tag, str) and tag in tagged:
                    return tagged[tag](value, path)
            for candidate in others:
                try:
                    return candidate(value, path)
                except WireError:
                    continue
            raise WireError(f"{_fmt(path)} matches none of the allowed types, got {_kind(value)}")

        return decode

    def _tuple_decoder(self, args: tuple[Any, ...]) -> _Decoder:
        if len(args) == 2 and args[1] is Ellipsis:
            item = self._compile(args[0])

            def decode_var(value: Any, path: Any) -> Any:
                if not isinstance(value, list | tuple):
                    raise WireError(f"{_fmt(path)} must be an array, got {_kind(value)}")
                return tuple(item(v, (path, i)) for i, v in enumerate(value))

            return decode_var
        items = [self._compile(a) for a in args]

        def decode_fixed(value: Any, path: Any) -> Any:
            if not isinstance(value, list | tuple) or len(value) != len(items):
                raise WireError(
                    f"{_fmt(path)} must be an array of {len(items)}, got {_kind(value)}"
                )
            return tuple(d(v, (path, i)) for i, (d, v) in enumerate(zip(items, value, strict=True)))

        return decode_fixed


_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _encoding_plan(cls: type[Any]) -> list[tuple[str, bool]]:
    """Which fields of `cls` need converting (tuples, enums, nested dataclasses) on encode."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an unresolvable annotation: convert every field
        hints = {}
    plan = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        while isinstance(hint, typing.NewType):
            hint = hint.__supertype__
        members = typing.get_args(hint) if typing.get_origin(hint) in _UNIONS else (hint,)
        plain = all(m in _PLAIN or typing.get_origin(m) is typing.Literal for m in members)
        plan.append((f.name, plain))
    return plan


def _fmt(path: Any) -> str:
    """A field path for an error message: "t.gossip.updates[1].node"."""
    if isinstance(path, str):
        return path
    parent, key = path
    if isinstance(key, int):
        return f"{_fmt(parent)}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{_fmt(parent)}.{key}"
    return f"{_fmt(parent)}[{key!r:.40}]"


def _kind(value: Any) -> str:
    return type(value).__name__


def _exact(expected: type[Any], name: str) -> _Decoder:
    def decode(value: Any, path: Any) -> Any:
        # type() not isinstance(): a bool must not pass as an int, nor an int as a bool.
        if type(value) is not expected:
            raise WireError(f"{_fmt(path)} must be {name}, got {_kind(value)}")
        return value

    return decode


def _decode_float(value: Any, path: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError as exc:
            raise WireError(f"{_fmt(path)} is out of range for a float") from exc
    raise WireError(f"{_fmt(path)} must be a number, got {_kind(value)}")


_SCALARS: dict[Any, _Decoder] = {
    int: _exact(int, "an integer"),
    bool: _exact(bool, "a boolean"),
    str: _exact(str, "a string"),
    bytes: _exact(bytes, "bytes"),
    float: _decode_float,
}


def _enum_decoder(cls: type[enum.Enum]) -> _Decoder:
    def decode(value: Any, path: Any) -> Any:
        for member in cls:
            if type(member.value) is type(value) and member.value == value:
                return member
        raise WireError(f"{_fmt(path)} is not a valid {cls.__name__}: {value!r:.40}")

    return decode


def _literal_decoder(allowed: tuple[Any, ...]) -> _Decoder:
    def decode(value: Any, path: Any) -> Any:
        for option in allowed:
            if type(option) is type(value) and option == value:
                return option
        raise WireError(f"{_fmt(path)} must be one of {list(allowed)!r}, got {value!r:.40}")

    return decode


def _mapping_decoder(item: _Decoder) -> _Decoder:
    def decode(value: Any, path: Any) -> Any:
        if not isinstance(value, dict):
            raise WireError(f"{_fmt(path)} must be a map, got {_kind(value)}")
        out = {}
        for key, v in value.items():
            if type(key) is not str:
                raise WireError(f"{_fmt(path)} keys must be strings, got {_kind(key)}")
            out[key] = item(v, (path, key))
        return out

    return decode
