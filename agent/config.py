"""The agent's configuration, read once from its environment.

Every variable goes through the typed readers of agent/shared/env.py, so a typo
stops the agent at start with a message that names the variable (ConfigError).
The agent holds only what a node needs: its broker URL, where the signed
repository is and the root it pins, where the appliance keeps its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.shared.env import (
    SENTINEL_VARIABLES,
    ConfigError,
    env_float,
    env_int,
    env_list,
    env_redis_sentinel,
    env_redis_url,
    env_str,
    env_zone,
)
from agent.shared.protocol import HOSTNAME_RE, HOSTNAME_RULE
from agent.shared.repository import read_pinned_root
from agent.shared.sentinel import Sentinel, is_sentinel_url

# A checkout's var/, as the control side's default (tgpadmin/settings.py): the demo
# and the tests run both from one tree. An appliance sets TGP_VAR_DIR or the paths.
_DEFAULT_VAR = Path(__file__).resolve().parent.parent / "var"


@dataclass(frozen=True)
class AgentConfig:
    redis_url: str
    repo_url: str
    repo_root_file: Path
    control_pubkey: str
    control_pubkey_file: Path
    state_dir: Path
    driver: str
    heartbeat_interval: float
    download_chunk: int
    download_timeout: float
    download_min_rate: int
    download_attempts: int
    download_backoff: int
    download_backoff_max: int
    sim_step_seconds: str
    # The node(s) this process serves (set by the supervisor for its worker). A message
    # for any other node is refused. Several names only for a benchmark worker that
    # plays many simulated nodes.
    served: tuple[str, ...]
    instance: str
    time_zone: str
    # With a sentinel:// redis_url: the Sentinels' master name and their own credentials
    # (agent/shared/sentinel.py); None for a plain Redis.
    redis_sentinel: Sentinel | None = None

    @classmethod
    def from_env(cls) -> AgentConfig:
        var = Path(env_str("TGP_VAR_DIR", str(_DEFAULT_VAR)))
        served = tuple(env_list("TGP_AGENT_NODE"))
        for name in served:
            if not HOSTNAME_RE.match(name):
                raise ConfigError(f"TGP_AGENT_NODE: {name!r} is not {HOSTNAME_RULE}")
        # REDIS_URL or TGP_REDIS_URL_FILE (the node's own broker user), TLS checked; or the
        # Sentinels of a replicated Redis, which the agent asks where the primary is.
        redis_url = env_redis_url(f"redis://127.0.0.1:{env_int('TGP_EMBEDDED_REDIS_PORT', 6390)}/0")
        redis_sentinel = env_redis_sentinel(redis_url)
        if not is_sentinel_url(redis_url):
            # The agent has no system checks to warn with: a Sentinel setting next to a
            # plain URL is a half-made change to the node's configuration, and would
            # otherwise be ignored in silence (the control plane warns: tgpadmin.W010).
            stray = [name for name in SENTINEL_VARIABLES if env_str(name, "")]
            if stray:
                raise ConfigError(
                    f"{', '.join(stray)} set, but the broker URL (REDIS_URL or TGP_REDIS_URL_FILE) is not a "
                    "sentinel:// URL: set both, or neither."
                )
        return cls(
            redis_url=redis_url,
            redis_sentinel=redis_sentinel,
            repo_url=env_str("TGP_REPO_URL", "http://127.0.0.1:8001/"),
            # The repository's TUF root, pinned when the appliance is installed or enrolled.
            repo_root_file=Path(env_str("TGP_REPO_ROOT_FILE", str(var / "keys" / "repo-root.json"))),
            control_pubkey=env_str("TGP_CONTROL_PUBKEY", ""),
            control_pubkey_file=Path(env_str("TGP_CONTROL_PUBKEY_FILE", str(var / "keys" / "control.pub"))),
            state_dir=Path(env_str("TGP_NODE_STATE_DIR", str(var / "nodes"))),
            driver=env_str("TGP_NODE_DRIVER", "simulated"),
            heartbeat_interval=env_float("TGP_HEARTBEAT_INTERVAL", 15.0, minimum=0.1),
            download_chunk=env_int("TGP_DOWNLOAD_CHUNK", 1024 * 1024, minimum=1024),
            download_timeout=env_float("TGP_DOWNLOAD_TIMEOUT", 30.0, minimum=0.1),
            # Slow retrieval: a package download slower than this (bytes/s over each minute)
            # is cut and resumed by the next attempt (agent/download.py, MinRate).
            download_min_rate=env_int("TGP_DOWNLOAD_MIN_RATE", 1024, minimum=1),
            # The manual's policy: 10 attempts per round, with backoff between them (seconds).
            download_attempts=env_int("TGP_DOWNLOAD_ATTEMPTS", 10, minimum=1),
            download_backoff=env_int("TGP_DOWNLOAD_BACKOFF", 5, minimum=1),
            download_backoff_max=env_int("TGP_DOWNLOAD_BACKOFF_MAX", 300, minimum=0),
            # Simulated appliances only: each disruptive step takes a random time in this range ("0.5-2").
            sim_step_seconds=env_str("TGP_SIM_STEP_SECONDS", ""),
            served=served,
            instance=env_str("TGP_AGENT_INSTANCE", ""),
            time_zone=env_zone("TGP_TIME_ZONE", "Europe/Berlin"),
        )

    def trusted_root(self) -> bytes:
        """Read when needed, not at start: the demo builds its repository (and root) as the agents start."""
        return read_pinned_root(self.repo_root_file)

    def node_dir(self, hostname: str) -> Path:
        return self.state_dir / hostname


_current: AgentConfig | None = None


def config() -> AgentConfig:
    """The configuration of this process, read from the environment on first use."""
    global _current
    if _current is None:
        _current = AgentConfig.from_env()
    return _current


def configure(cfg: AgentConfig | None) -> None:
    """Replace this process's configuration (tests); None: read the environment again."""
    global _current
    _current = cfg
