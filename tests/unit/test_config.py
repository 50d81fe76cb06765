"""The layered configuration: defaults < file < environment < flags, with clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from spear.config import Config, load_config
from spear.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "spear.toml.example"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _keys(ann, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" != "node.labels":
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_example_loads_and_documents_every_key_with_its_default() -> None:
    config = load_config(EXAMPLE, env={})
    assert config == Config()
    with EXAMPLE.open("rb") as fh:
        documented = _flatten(tomllib.load(fh))
    assert set(documented) == _keys(Config)


def test_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "spear.toml"
    path.write_text('[gateway]\nhttp = "127.0.0.1:9000"\n[runtimes.wasm]\nfuel = 5\n')
    config = load_config(path, env={})
    assert config.gateway.http == "127.0.0.1:9000"
    assert config.runtimes.wasm.fuel == 5

    env = {"SPEAR_GATEWAY__HTTP": "127.0.0.1:9100", "SPEAR_RUNTIMES__WASM__FUEL": "7"}
    config = load_config(path, env=env)
    assert (config.gateway.http, config.runtimes.wasm.fuel) == ("127.0.0.1:9100", 7)

    config = load_config(path, env=env, overrides={"gateway.http": "127.0.0.1:9200"})
    assert config.gateway.http == "127.0.0.1:9200"
    assert config.runtimes.wasm.fuel == 7


def test_env_lists_and_tables_are_toml_values() -> None:
    config = load_config(
        env={"SPEAR_MESH__JOIN": '["10.0.0.1:7946", "h:1"]', "SPEAR_NODE__LABELS": '{zone = "a"}'}
    )
    assert config.mesh.join == ["10.0.0.1:7946", "h:1"]
    assert config.node.labels == {"zone": "a"}


def test_unrelated_environment_is_ignored() -> None:
    assert load_config(env={"SPEAR_SERVER": "x", "PATH": "/bin"}) == Config()


@pytest.mark.parametrize(
    ("env", "overrides", "expected"),
    [
        ({"SPEAR_NODE__COLOUR": "red"}, {}, "unknown config key node.colour"),
        ({"SPEAR_RUNTIMES__WASM__FUEL": "-1"}, {}, "runtimes.wasm.fuel must be greater than"),
        ({}, {"gateway.http": "nope"}, "gateway.http must be HOST:PORT, got 'nope'"),
        ({}, {"store.backend": "oracle"}, "store.backend must be 'sqlite', 'memory'"),
        ({}, {"raft.bootstrap_expect": "many"}, "raft.bootstrap_expect must be a valid integer"),
        ({"SPEAR_MESH__JOIN": "[1"}, {}, "SPEAR_MESH__JOIN is not a valid TOML list"),
    ],
)
def test_bad_values_name_the_dotted_key(
    env: dict[str, str], overrides: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env, overrides=overrides)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_and_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "spear.toml"
    path.write_text("[runtimes.wasm]\nfuell = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key runtimes\.wasm\.fuell"):
        load_config(path, env={})
    path.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", env={})


def test_a_default_above_its_maximum_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"runtimes.default_timeout_ms": 99_999_999})
    assert str(info.value) == (
        "runtimes.default_timeout_ms (99999999) must be at most max_timeout_ms (900000)"
    )
