"""Process-wide settings, read once from the environment.

| variable | meaning | default |
|---|---|---|
| `FTS_HOME` | where jobs, the job store and outputs live | the per-user data folder (`platformdirs`) |
| `FTS_ROOTS` | folders (`os.pathsep`) path arguments must be in, besides `FTS_HOME` | start folder (not `/`, `~`) |
| `FTS_STORE` | the adapter store folder, the same for every tool and command (a URL: `edge serve`) | `FTS_HOME/store` |
| `FTS_GPUS` | CUDA device indices to run jobs on (`0,1`), or `none` for the CPU slots | every visible CUDA device |
| `FTS_CPU_SLOTS` | slots when there is no GPU (a training job with `workers: N` takes N) | 1 |
| `FTS_RUNTIME_SLOTS` | managed edge runtimes at once without GPUs (`serve:N` slots, never a CPU slot) | 2 |
| `FTS_CPU_TFLOPS` | this CPU's float32 TFLOP/s, for `estimate_resources` on a host without a GPU | measured (0.3 s) |
| `FTS_TRUST_REMOTE_CODE` | `1` lets models run code shipped in their repository | off |
| `FTS_CANCEL_GRACE_SECONDS` | how long a cancelled worker may take to checkpoint before SIGKILL | 60 |
| `FTS_RUNTIME_HOSTS` | hosts (`gpu-1.lan,10.0.0.5`) `runtime_url` may name besides loopback and `local` | none |
| `FTS_HTTP_MAX_SESSIONS` | HTTP sessions kept; when full, the least recently used idle one is closed | 64 |
| `FTS_HTTP_MAX_SESSIONS_PER_CLIENT` | of those, sessions one client address may hold | 16 |
| `FTS_HTTP_SESSION_IDLE_SECONDS` | an HTTP session with no request for this long is closed | 600 |
| `FTS_RUNNER` | where jobs run: `local` (worker processes on this host) or `ray` (a Ray cluster's Jobs API) | `local` |
| `FTS_RAY_ADDRESS` | the Ray cluster's job-submission address (`http://head:8265`); `RAY_ADDRESS` also works | |
| `FTS_RAY_GPUS_PER_WORKER` | GPUs each Ray worker asks for (`0` on a CPU cluster) | 1 if the cluster has GPUs, else 0 |
| `FTS_RAY_START_TIMEOUT_SECONDS` | how long a Ray job may wait to start (busy cluster, runtime env), then fails | 600 |
| `FTS_RAY_MAX_JOBS` | jobs submitted to the cluster at once (more wait `queued` here) | 8 |
| `RAY_AUTH_TOKEN` | sent as a bearer token to a cluster started with token authentication | |
| `FTS_RAY_STORAGE` | storage Ray jobs send folders back through instead of their log (`s3://b/p`, `/mnt/x`) | none |
| `FTS_RAY_RUNTIME_ENV` | JSON added to each Ray job's runtime environment (`pip`, `uv`, `conda`, `env_vars`) | `{}` |
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from fts_mcp.errors import InvalidArgument

CPU_SLOT = "cpu"
SERVE_SLOT = "serve"


def _cpu_slots(env: dict[str, str]) -> tuple[str, ...]:
    """`cpu`, then `cpu:1`, `cpu:2`... as many as FTS_CPU_SLOTS (jobs and data-parallel ranks on the CPU)."""
    count = int(_number_env(env, "FTS_CPU_SLOTS", 1, 1, 256, whole=True))
    return (CPU_SLOT, *(f"{CPU_SLOT}:{i}" for i in range(1, count)))


def _gpu_slots(env: dict[str, str]) -> tuple[str, ...]:
    """One slot per usable CUDA device, found without importing torch (the server must start fast)."""
    if (wanted := env.get("FTS_GPUS")) is not None:
        wanted = wanted.strip()
        if wanted.lower() in ("", "none", "cpu"):
            return ()
        ids = [part.strip() for part in wanted.split(",") if part.strip()]
        if not all(i.isdigit() for i in ids):
            raise InvalidArgument(f"expected comma-separated CUDA device indices such as '0,1', or 'none'; "
                                  f"got {wanted!r}", param="FTS_GPUS")
        return tuple(f"cuda:{i}" for i in ids)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part for part in visible.split(",") if part.strip() and part.strip() != "-1"]
        return tuple(f"cuda:{n}" for n in range(len(ids)))
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    return tuple(f"cuda:{n}" for n in range(count))


def _number_env(env: dict[str, str], name: str, default: float, low: float, high: float, *,
                whole: bool = False, low_open: bool = False) -> float:
    """A number from the environment within [low, high] (or (low, high] with `low_open`), else a named error."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = float("nan")
    if not (low < value if low_open else low <= value) or not value <= high:
        kind = "a whole number" if whole else "a number"
        bound = f"above {low:g}" if low_open else f"from {low:g}"
        raise InvalidArgument(f"{name} must be {kind} {bound} to {high:g}, got {raw!r}", param=name)
    return value


RUNNERS = ("local", "ray")


def _runner(env: dict[str, str]) -> str:
    runner = (env.get("FTS_RUNNER") or "local").strip().lower()
    if runner not in RUNNERS:
        raise InvalidArgument(f"FTS_RUNNER must be one of {', '.join(RUNNERS)}, got {runner!r}", param="FTS_RUNNER")
    if runner == "ray" and not (env.get("FTS_RAY_ADDRESS") or env.get("RAY_ADDRESS")):
        raise InvalidArgument("FTS_RUNNER=ray needs the cluster's job-submission address in FTS_RAY_ADDRESS, e.g. "
                              "http://127.0.0.1:8265 (the head node's dashboard port)", param="FTS_RAY_ADDRESS")
    return runner


# image_uri and container cannot be combined with the working_dir and py_modules every job carries
RAY_ENV_KEYS = frozenset({"pip", "uv", "conda", "env_vars", "config"})


def _ray_runtime_env(env: dict[str, str]) -> dict:
    """FTS_RAY_RUNTIME_ENV: a JSON object of Ray runtime-environment fields each job adds (the packages the cluster
    lacks, its image, environment variables). working_dir and py_modules carry the job itself: not settable."""
    raw = env.get("FTS_RAY_RUNTIME_ENV", "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"FTS_RAY_RUNTIME_ENV must be a JSON object: {exc}",
                              param="FTS_RAY_RUNTIME_ENV") from None
    if not isinstance(value, dict) or not set(value) <= RAY_ENV_KEYS:
        extra = sorted(set(value) - RAY_ENV_KEYS) if isinstance(value, dict) else value
        raise InvalidArgument(f"FTS_RAY_RUNTIME_ENV takes an object with fields among {', '.join(sorted(RAY_ENV_KEYS))}"
                              f"; got {extra!r}", param="FTS_RAY_RUNTIME_ENV")
    if sum(k in value for k in ("pip", "uv", "conda")) > 1:
        raise InvalidArgument("FTS_RAY_RUNTIME_ENV takes one of pip, uv or conda (Ray allows no more)",
                              param="FTS_RAY_RUNTIME_ENV")
    for key, kinds in (("pip", (list, dict, str)), ("uv", (list, dict, str)), ("conda", (dict, str)),
                       ("config", (dict,))):
        if key in value and not isinstance(value[key], kinds):
            raise InvalidArgument(f"FTS_RAY_RUNTIME_ENV's {key} is {' or '.join(k.__name__ for k in kinds)}, got "
                                  f"{value[key]!r}", param="FTS_RAY_RUNTIME_ENV")
    variables = value.get("env_vars", {})
    if not isinstance(variables, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in variables.items()):
        raise InvalidArgument("FTS_RAY_RUNTIME_ENV's env_vars is an object of strings to strings",
                              param="FTS_RAY_RUNTIME_ENV")
    return value


STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def _ray_storage(env: dict[str, str]) -> str | None:
    """FTS_RAY_STORAGE: where Ray jobs put the folders they send back (pyarrow filesystem URI or absolute path)."""
    raw = env.get("FTS_RAY_STORAGE", "").strip()
    if not raw:
        return None
    scheme, _, rest = raw.partition("://") if "://" in raw else (None, "", raw)
    scheme = scheme.lower() if scheme else None
    bad = (not raw.startswith("/")) if scheme is None else scheme not in STORAGE_SCHEMES or (
        not rest.startswith("/") if scheme == "file" else not rest.strip("/"))  # file: absolute; others: a bucket
    if bad:
        raise InvalidArgument(f"FTS_RAY_STORAGE is a URI ({', '.join(s + '://' for s in STORAGE_SCHEMES)}) or an "
                              f"absolute folder both the server and the cluster reach; got {raw!r}",
                              param="FTS_RAY_STORAGE")
    return raw


HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def canonical_host(host: str) -> str | None:
    """A host name lower-cased, or an IP address in its canonical form (IPv6 without brackets); None for anything
    else (a port, a scheme, a path, a wildcard)."""
    host = host.strip().lower()
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return host if len(host) <= 253 and HOST_NAME_RE.fullmatch(host) else None


def runtime_hosts(env: dict[str, str]) -> frozenset[str]:
    """FTS_RUNTIME_HOSTS: the hosts besides loopback a `runtime_url` may name (comma-separated names or IPs)."""
    hosts = set()
    for given in (part.strip() for part in env.get("FTS_RUNTIME_HOSTS", "").split(",")):
        if not given:
            continue
        if (host := canonical_host(given)) is None:
            raise InvalidArgument(f"FTS_RUNTIME_HOSTS takes comma-separated host names or IP addresses, such as "
                                  f"'gpu-1.internal,10.0.0.5' (no scheme, port or path); got {given[:100]!r}",
                                  param="FTS_RUNTIME_HOSTS")
        hosts.add(host)
    return frozenset(hosts)


@dataclass(frozen=True)
class SessionBounds:
    """How many streamable HTTP sessions the MCP server keeps, and for how long (the SDK's defaults let a flood of
    `initialize` calls hold 10,000 sessions for 30 minutes each and lock every new client out)."""

    total: int = 64
    """Sessions open at once; a new one closes the least recently used idle one (503 only when all are busy)."""
    per_client: int = 16
    """Sessions one client address may hold; past it, its own least recently used idle one is closed."""
    idle_seconds: float = 600.0
    """A session with no request in flight for this long is closed; its client must initialize again."""


def _session_bounds(env: dict[str, str]) -> SessionBounds:
    total = int(_number_env(env, "FTS_HTTP_MAX_SESSIONS", 64, 1, 100_000, whole=True))
    per_client = int(_number_env(env, "FTS_HTTP_MAX_SESSIONS_PER_CLIENT", 16, 1, 100_000, whole=True))
    idle = _number_env(env, "FTS_HTTP_SESSION_IDLE_SECONDS", 600.0, 0, 86_400, low_open=True)
    return SessionBounds(total=total, per_client=min(per_client, total), idle_seconds=idle)


URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # what FTS_STORE holds when it is a URL, not a folder


def default_roots(home: Path, cwd: Path, user_home: Path) -> tuple[Path, ...]:
    """FTS_HOME, and the folder the server started in unless that is `/`, the user's home or a folder above it:
    desktop clients often start servers there, and none may silently make the whole disk (or every dotfile)
    readable."""
    if cwd in (Path(cwd.anchor), home) or user_home.is_relative_to(cwd):  # /, ~, or a folder above ~ (/home)
        return (home,)
    return (home, cwd)


@dataclass(frozen=True)
class Settings:
    home: Path
    roots: tuple[Path, ...]
    slots: tuple[str, ...]
    trust_remote_code: bool = False
    cancel_grace_seconds: float = 60.0
    heartbeat_seconds: float = 1.0
    # A running job whose worker pid is gone and whose heartbeat is older than this is declared interrupted.
    heartbeat_stale_seconds: float = 3.0
    # A job claimed by a server that died before it could start the worker is interrupted after this long.
    start_timeout_seconds: float = 60.0
    runner: str = "local"
    # Managed edge runtimes at once on a host without GPUs (serve:N slots; on a GPU host they take GPU slots).
    runtime_slots: int = 2
    # FTS_RAY_GPUS_PER_WORKER; when unset (not `_set`), each job's supervisor chooses it from the cluster's GPUs and
    # this 1 stands only where the cluster cannot be asked (jobs.ray.placement.choose_gpus)
    ray_gpus_per_worker: float = 1.0
    ray_gpus_per_worker_set: bool = False
    ray_start_timeout_seconds: float = 600.0
    ray_max_jobs: int = 8
    ray_runtime_env: dict = field(default_factory=dict)
    ray_storage: str | None = None
    runtime_hosts: frozenset[str] = frozenset()
    http_sessions: SessionBounds = SessionBounds()
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("FTS_HOME") or platformdirs.user_data_dir("fts-mcp")).expanduser().resolve()
        if env.get("FTS_ROOTS"):  # FTS_HOME stays a root: merged models, adapters and the demo model live there
            given = tuple(Path(p).expanduser().resolve() for p in env["FTS_ROOTS"].split(os.pathsep) if p)
            roots = given if any(home == r or home.is_relative_to(r) for r in given) else (home, *given)
        else:
            roots = default_roots(home, Path.cwd().resolve(), Path(env.get("HOME") or Path.home()).resolve())
        return cls(
            home=home,
            roots=roots,
            slots=_gpu_slots(env) or _cpu_slots(env),
            trust_remote_code=env.get("FTS_TRUST_REMOTE_CODE", "").lower() in ("1", "true", "yes"),
            cancel_grace_seconds=_number_env(env, "FTS_CANCEL_GRACE_SECONDS", 60.0, 0, 86_400, low_open=True),
            runner=_runner(env),
            runtime_slots=int(_number_env(env, "FTS_RUNTIME_SLOTS", 2, 1, 64, whole=True)),
            ray_gpus_per_worker=_number_env(env, "FTS_RAY_GPUS_PER_WORKER", 1.0, 0.0, 64.0),
            ray_gpus_per_worker_set=bool(env.get("FTS_RAY_GPUS_PER_WORKER", "").strip()),
            ray_start_timeout_seconds=_number_env(env, "FTS_RAY_START_TIMEOUT_SECONDS", 600.0, 0, 86_400,
                                                  low_open=True),
            ray_max_jobs=int(_number_env(env, "FTS_RAY_MAX_JOBS", 8, 1, 1024, whole=True)),
            ray_runtime_env=_ray_runtime_env(env),
            ray_storage=_ray_storage(env),
            runtime_hosts=runtime_hosts(env),
            http_sessions=_session_bounds(env),
            env=env,
        )

    @property
    def store(self) -> Path:
        """The adapter store folder every command and tool publishes to and serves from. A URL is refused, naming
        FTS_STORE: the server publishes into its store, and a store served over HTTP can only be read (as a path
        it would become a folder named `http:` under the start folder, outside FTS_HOME and the roots)."""
        given = self.env.get("FTS_STORE", "").strip()
        if URL_RE.match(given):
            raise InvalidArgument(f"FTS_STORE is {given[:200]!r}, a URL; the MCP server and `fts-mcp deploy` publish "
                                  "into the store, so it must be a folder on this host: set FTS_STORE to the folder "
                                  "that URL serves (an absolute path), and give the URL to `fts-mcp edge serve --store "
                                  "URL`, which only reads", param="FTS_STORE")
        return Path(given or self.home / "store").expanduser().resolve()

    @property
    def store_location(self) -> str:
        """Where `fts-mcp edge serve` reads adapters by default: FTS_STORE as given when it is an http(s) URL (the
        runtime reads such a store), else the store folder."""
        given = self.env.get("FTS_STORE", "").strip()
        return given if given.startswith(("http://", "https://")) else str(self.store)

    @property
    def edge_cache(self) -> Path:
        """Where adapters fetched from an HTTP store are kept, by version."""
        return self.home / "edge-cache"

    @property
    def ray_address(self) -> str | None:
        return self.env.get("FTS_RAY_ADDRESS") or self.env.get("RAY_ADDRESS")

    @property
    def serve_slots(self) -> tuple[str, ...]:
        """Where managed edge runtimes run on a host without GPUs: `serve:0`, `serve:1`... (FTS_RUNTIME_SLOTS), apart
        from the CPU slots jobs train and generate on, so a runtime serving for hours never holds those."""
        return tuple(f"{SERVE_SLOT}:{n}" for n in range(self.runtime_slots))

    @property
    def ray_slots(self) -> tuple[str, ...]:
        """With FTS_RUNNER=ray, how many jobs may be on the cluster at once: each takes one `ray:N` slot here,
        whatever it asks of the cluster (the cluster schedules its workers)."""
        return tuple(f"ray:{n}" for n in range(self.ray_max_jobs)) if self.runner == "ray" else ()

    @property
    def db_path(self) -> Path:
        return self.home / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id
