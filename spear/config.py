"""spear's configuration: one frozen tree, loaded in layers.

Precedence, lowest first: built-in defaults < `spear.toml` < environment variables
`SPEAR_<SECTION>__<KEY>` (nested sections joined by `__`, e.g. `SPEAR_RUNTIMES__WASM__FUEL`)
< command-line flags. An unknown key or a bad value raises ConfigError naming the dotted key and
the rule. Each component receives only its own section. `spear.toml.example` documents every
key with its default.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spear.errors import ConfigError

MiB = 1024 * 1024
ENV_PREFIX = "SPEAR_"


def parse_hostport(value: str) -> tuple[str, int]:
    """Split "HOST:PORT" (IPv6 as "[::1]:PORT"); raise ValueError naming the rule."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host.strip("[]"), port


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class NodeConfig(Section):
    name: str = Field(default="", description="node name; empty = the host name")
    data_dir: str = "spear-data"
    labels: dict[str, str] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    report_interval_ms: int = Field(
        default=1000, ge=50, le=60_000, description="resource report to the leader, every"
    )
    max_running: int = Field(
        default=0, ge=0, le=100_000, description="executions run at once; 0 = 8 per CPU"
    )

    @property
    def display_name(self) -> str:
        return self.name or socket.gethostname()


class MeshConfig(Section):
    listen: str = "127.0.0.1:7946"
    join: list[str] = Field(default_factory=list)
    join_token: str = ""
    max_frame_bytes: int = Field(default=16 * MiB, ge=1024)
    profile: Literal["lan", "lan-fast", "loopback"] = Field(
        default="lan", description="SWIM and Raft timings (docs/cluster.md)"
    )

    @field_validator("listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("join")
    @classmethod
    def _hostports(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_hostport(item)
        return v


class RaftConfig(Section):
    bootstrap_expect: int = Field(default=1, ge=1, le=9)
    voter: Literal["auto", "yes", "no"] = Field(
        default="auto", description="auto = a voter if bootstrap_expect > 1 or mesh.join is empty"
    )


class StoreConfig(Section):
    backend: Literal["sqlite", "memory", "rocksdb", "lmdb"] = "sqlite"
    path: str = Field(default="", description="empty = <node.data_dir>/store.<backend>")


class GatewayConfig(Section):
    http: str = "127.0.0.1:8080"
    max_upload_bytes: int = Field(default=64 * MiB, ge=1)
    max_invoke_body_bytes: int = Field(default=6 * MiB, ge=0)
    keep_alive_max_requests: int = Field(default=100_000, ge=1)
    graceful_timeout_s: float = Field(default=5.0, ge=0)

    @field_validator("http")
    @classmethod
    def _hostport(cls, v: str) -> str:
        parse_hostport(v)
        return v


class WasmConfig(Section):
    enabled: bool = True
    cache_dir: str = Field(default="", description="empty = <node.data_dir>/wasm-cache")
    fuel: int = Field(default=0, ge=0, description="fuel per invocation; 0 = no fuel metering")
    epoch_tick_ms: int = Field(default=5, ge=1, le=1000)
    max_wasm_stack_bytes: int = Field(default=1 * MiB, ge=64 * 1024, le=2 * MiB)
    max_threads: int = Field(default=0, ge=0, description="concurrent guests; 0 = 4 x CPUs")
    inline_budget_ms: float = Field(
        default=2.0, ge=0, le=50, description="run on the loop's thread up to this; 0 = never"
    )


class ProcessConfig(Section):
    enabled: bool = True
    pass_env: list[str] = Field(default_factory=lambda: ["PATH", "LANG", "TZ"])
    rlimit_nofile: int = Field(default=256, ge=16)
    rlimit_nproc: int = Field(default=0, ge=0, description="0 = unchanged")
    cpu_time_limit_s: int = Field(default=0, ge=0, description="RLIMIT_CPU; 0 = from timeout")
    isolate_network: bool = False
    work_dir: str = Field(default="", description="empty = <node.data_dir>/work")
    worker_start_timeout_ms: int = Field(
        default=30_000,
        ge=1,
        description="a worker's start, up to its hello (at least the task's timeout)",
    )
    worker_cancel_grace_ms: int = Field(
        default=500, ge=0, description="a cancelled request's answer, before the worker is killed"
    )
    cgroups: Literal["auto", "off"] = Field(
        default="auto", description="a cgroup per instance when root and writable; off = rlimits"
    )
    cpus: float = Field(default=0.0, ge=0, le=1024, description="CPU quota per instance; 0 = none")
    pids_limit: int = Field(
        default=0, ge=0, le=1 << 22, description="processes per instance (cgroups); 0 = none"
    )


class DockerConfig(Section):
    """The `[runtimes.docker]` section: the daemon, and the limits every container gets."""

    enabled: bool = True
    host: str = Field(default="", description="daemon URL; empty = DOCKER_HOST or the default")
    pull_policy: Literal["never", "if-missing"] = Field(
        default="never", description="never: images must already be on the daemon"
    )
    network: str = Field(default="none", min_length=1, description="container network mode")
    cpus: float = Field(default=1.0, ge=0, le=1024, description="CPU quota; 0 = no quota")
    pids_limit: int = Field(default=128, ge=1, le=1 << 22)
    read_only_rootfs: bool = True
    tmp_size_bytes: int = Field(
        default=16 * MiB, ge=0, description="tmpfs on /tmp (counts as memory); 0 = none"
    )
    max_api_calls: int = Field(
        default=16, ge=1, le=256, description="daemon calls in flight (worker threads)"
    )
    api_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    pull_timeout_s: float = Field(default=300.0, gt=0, le=86400)


class RuntimesConfig(Section):
    default_timeout_ms: int = Field(default=30_000, ge=1)
    max_timeout_ms: int = Field(default=900_000, ge=1)
    default_memory_limit_bytes: int = Field(default=128 * MiB, ge=65536)
    max_output_bytes: int = Field(default=6 * MiB, ge=0)
    max_log_bytes: int = Field(default=1 * MiB, ge=0)
    wasm: WasmConfig = Field(default_factory=WasmConfig)
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    docker: DockerConfig = Field(default_factory=DockerConfig)

    @model_validator(mode="after")
    def _default_within_max(self) -> RuntimesConfig:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) must be at most"
                f" max_timeout_ms ({self.max_timeout_ms})"
            )
        return self


class PoolConfig(Section):
    """Defaults of the warm-instance pools of tasks in mode `worker` (docs/pool.md)."""

    min_instances: int = Field(default=0, ge=0, le=1024, description="kept warm, prewarmed")
    max_instances: int = Field(default=4, ge=1, le=1024)
    max_concurrency: int = Field(default=1, ge=1, le=1024, description="requests per instance")
    idle_timeout_s: float = Field(default=300.0, gt=0, le=86400)
    max_requests: int = Field(default=0, ge=0, description="requests before recycling; 0 = never")
    acquire_timeout_ms: int = Field(default=10_000, ge=0, le=900_000)
    max_waiters: int = Field(default=1000, ge=0, le=100_000, description="callers queued per task")

    @model_validator(mode="after")
    def _min_within_max(self) -> PoolConfig:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) must be at most"
                f" max_instances ({self.max_instances})"
            )
        return self


class SmsConfig(Section):
    sync_record_limit: int = Field(default=10_000, ge=1, description="sync records kept")
    sync_record_bytes: int = Field(default=64 * MiB, ge=0, description="their output + logs")
    async_queue_limit: int = Field(default=10_000, ge=1, description="accepted, not yet run")
    async_workers: int = Field(
        default=4, ge=1, description="async executions placed and dispatched at once"
    )
    spearlet_lease_ms: int = Field(
        default=4000,
        ge=100,
        le=600_000,
        description="a Spearlet not heard from this long loses its dispatched work",
    )


class Config(Section):
    node: NodeConfig = Field(default_factory=NodeConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    raft: RaftConfig = Field(default_factory=RaftConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    runtimes: RuntimesConfig = Field(default_factory=RuntimesConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    sms: SmsConfig = Field(default_factory=SmsConfig)

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the layered configuration.

    Args:
        path: a TOML file, or None for defaults only.
        env: the environment to read `SPEAR_*` variables from (default: os.environ).
        overrides: dotted keys to values, from command-line flags (None values are ignored).

    Raises:
        ConfigError: the file is unreadable or not TOML, or a key is unknown or invalid.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        _merge(tree, _read_toml(path))
    _merge(tree, _env_tree(os.environ if env is None else env))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return Config.model_validate(tree)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def _env_tree(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        _set_dotted(tree, dotted, _env_value(name, raw))
    return tree


def _env_value(name: str, raw: str) -> Any:
    # Lists and tables are written as TOML inline values; scalars are left as strings and
    # coerced by the field's type ("8080" -> int, "true" -> bool).
    if raw.lstrip().startswith(("[", "{")):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{name} is not a valid TOML list or table: {exc}") from exc
    return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted} cannot be set: {part} is not a section")
        node = child
    node[leaf] = value


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _describe(exc: pydantic.ValidationError) -> str:
    messages = []
    for err in exc.errors():
        dotted = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            messages.append(f"unknown config key {dotted}")
            continue
        rule = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
        if isinstance(err.get("input"), dict):  # a rule across keys of this section
            messages.append(f"{dotted}.{rule}")
            continue
        got = "" if "got" in rule else f", got {err.get('input')!r}"
        messages.append(f"{dotted} {rule[0].lower()}{rule[1:]}{got}")
    return "; ".join(messages)
