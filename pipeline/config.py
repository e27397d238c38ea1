"""TOML configuration: frozen dataclasses, validated on load, secrets read from env by name."""

from __future__ import annotations

import posixpath
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.errors import ConfigError
from pipeline.stores import StoreOptions

ID_TYPES = ("ecid", "declared")
ID_KINDS = ("email", "phone", "crm")
ENCODINGS = ("plain", "sha256", "encrypted", "auto")
ALGORITHMS = ("aes-gcm", "aes-cbc")
FEED_KINDS = ("aam_segments", "campaign_export")
DEST_KINDS = ("campaign_list", "aam_inbound", "no_profile_contacts")
DPUUID_IDS = ("email_sha256", "profile_id", "crm_id", "ecid")
# Feed and destination names become folder names under the state location and targets.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_SEGMENT_ID = 2**32 - 1  # segment IDs are UInt32 through the pipeline (formats.parse_lines)
MAX_AAM_ID = 2**31 - 1  # AAM trait IDs and data source IDs (DPID) are 32-bit signed integers
# Snapshot columns the product reads (SPEC §4); `[profiles] columns` may rename each of them.
PROFILE_COLUMNS = ("profile_id", "email", "phone", "country", "ecid", "crm_id", "opt_out",
                   "blacklisted")
EXECUTORS = ("local", "dask")


@dataclass(frozen=True)
class Location:
    """A store URL with its connection options."""

    url: str
    options: StoreOptions = field(default_factory=StoreOptions)


@dataclass(frozen=True)
class FeedConfig:
    name: str
    source: Location
    kind: str = "aam_segments"
    id_types: tuple[str, ...] = ("declared",)
    id_kinds: tuple[str, ...] = ("email",)
    id_encoding: str = "plain"
    default_country: str | None = None
    decryption: str | None = None
    key_env: str | None = None
    key: bytes | None = field(default=None, repr=False)
    iv_env: str | None = None
    iv: bytes | None = field(default=None, repr=False)
    max_reject_ratio: float = 0.05
    require_info: bool = True
    max_removal_ratio: float = 0.5  # a `full` delivery may remove at most this share of pairs
    membership_retention_days: int = 35  # membership versions kept for backfill
    match_column: str | None = None  # crm: snapshot column to reconcile on; None = crm_id's
    pgp_secret_key_file: str | None = None  # OpenPGP-encrypted files (SPEC §12)
    pgp_passphrase: str | None = field(default=None, repr=False)
    pgp_signer_key_file: str | None = None  # then every file must be signed by this key

    @property
    def kinds(self) -> tuple[str, ...]:
        """Key kinds this feed's IDs may be, in detection order (ECID, email, phone, CRM)."""
        declared = self.id_kinds if "declared" in self.id_types else ()
        ecid = ("ecid",) if "ecid" in self.id_types else ()
        return ecid + tuple(k for k in ID_KINDS if k in declared)


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    kind: str
    target: Location
    format: str = "csv"
    dpid: int | None = None
    id: str = "email_sha256"
    segment_filter: tuple[int, ...] | None = None  # campaign_list: segments to export
    traits: Mapping[int, int] = field(default_factory=dict)  # aam_inbound: segment -> trait
    audiences: Mapping[str, int] = field(default_factory=dict)  # campaign_export: name -> trait
    max_lines_per_file: int = 5_000_000
    gzip: bool = False
    pgp_recipient_key_file: str | None = None  # encrypt every published file to this key


@dataclass(frozen=True)
class ExecutorConfig:
    """Where a delivery's heavy passes run: in this process, or as tasks on a Dask cluster."""

    kind: str = "local"
    scheduler: str | None = None  # tcp://host:port of an existing Dask scheduler
    work_location: Location | None = None  # intermediate files, reachable by every worker
    performance_report: str | None = None  # local path for Dask's performance report (HTML)


@dataclass(frozen=True)
class Config:
    state: Location
    snapshot: Location
    default_country: str | None
    feeds: tuple[FeedConfig, ...]
    destinations: tuple[DestinationConfig, ...]
    profile_columns: Mapping[str, str] = field(default_factory=dict)  # product -> snapshot
    work_dir: str | None = None  # local folder for per-run work folders; None: system temp
    index_cache: bool = True  # [profiles] index_cache: reuse the normalized snapshot index
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    @property
    def crm_matches(self) -> dict[str, str]:
        """Snapshot columns that crm feeds reconcile on (besides crm_id's) -> the key naming it."""
        return {f.match_column: f"feeds.{f.name}.match_column"
                for f in self.feeds if f.match_column is not None}


def load_config(path: str | Path, env: Mapping[str, str], secrets: bool = True) -> Config:
    """Read and validate a config file; every problem is a ConfigError naming the key.

    `secrets=False` (for `status`, which only reads the ledger) leaves keys unread."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(raw, env, base_dir=path.parent, secrets=secrets)


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str], base_dir: Path,
                 secrets: bool = True) -> Config:
    _known(raw, "", {"state", "profiles", "feeds", "destinations", "executor"})
    state = _table(raw, "state", required=True)
    _known(state, "state", {"location", "known_hosts", "identity_file", "work_dir"})
    profiles = _table(raw, "profiles", required=True)
    _known(profiles, "profiles",
           {"snapshot", "default_country", "known_hosts", "identity_file", "columns",
            "index_cache"})
    columns = _profile_columns(profiles.get("columns"))
    feeds_raw = _array(raw, "feeds")
    dests_raw = _array(raw, "destinations")
    crm_column = columns.get("crm_id", "crm_id")
    feeds = tuple(_feed(f, i, env if secrets else None, base_dir, crm_column)
                  for i, f in enumerate(feeds_raw))
    dests = tuple(_destination(d, i, base_dir) for i, d in enumerate(dests_raw))
    _unique([f.name for f in feeds], "feeds")
    _unique([d.name for d in dests], "destinations")
    _check_export_targets(feeds, dests)
    country = _opt(profiles, "profiles", "default_country", str)
    state_location = _location(state, "state", "location", base_dir)
    snapshot = _location(profiles, "profiles", "snapshot", base_dir)
    _check_overlaps(state_location, snapshot, feeds, dests)
    return Config(
        state=state_location,
        snapshot=snapshot,
        default_country=_country(country, "profiles.default_country"),
        feeds=feeds,
        destinations=dests,
        profile_columns=columns,
        work_dir=_work_dir(state, base_dir),
        index_cache=_opt(profiles, "profiles", "index_cache", bool, True),
        executor=_executor(_table(raw, "executor", required=False), base_dir),
    )


def _work_dir(state: Mapping[str, Any], base_dir: Path) -> str | None:
    """`[state] work_dir`: a local folder (spills may hold decrypted IDs: never a store)."""
    value = _opt(state, "state", "work_dir", str)
    if value is None:
        return None
    if "://" in value or not value.strip():
        raise ConfigError("state.work_dir: must be a local folder path")
    return str((base_dir / Path(value).expanduser()).absolute())


def _profile_columns(value: Any) -> dict[str, str]:
    """`[profiles] columns`: product column name -> the snapshot's name for it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("profiles.columns: must be a table (product name = snapshot name)")
    for product, name in value.items():
        if product not in PROFILE_COLUMNS:
            raise ConfigError(f"profiles.columns.{product}: unknown column, expected one of "
                              f"{', '.join(PROFILE_COLUMNS)}")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"profiles.columns.{product}: must be a snapshot column name")
    return dict(value)


def with_executor(config: Config, kind: str | None, scheduler: str | None) -> Config:
    """The command line's --executor / --scheduler over the config's [executor] table."""
    current = config.executor
    chosen = replace(current, kind=kind or current.kind,
                     scheduler=scheduler or current.scheduler)
    check_executor(chosen, "--executor" if kind else "executor.kind")
    return replace(config, executor=chosen)


def _executor(raw: Mapping[str, Any], base_dir: Path) -> ExecutorConfig:
    _known(raw, "executor", {"kind", "scheduler", "work_location", "performance_report"})
    work = None
    if raw.get("work_location") is not None:
        if str(raw["work_location"]).startswith("sftp://"):
            raise ConfigError("executor.work_location: must be a local path or s3:// "
                              "(workers write their intermediate files there)")
        work = _location(raw, "executor", "work_location", base_dir)
    executor = ExecutorConfig(kind=_choice(raw, "executor", "kind", EXECUTORS, "local"),
                              scheduler=_opt(raw, "executor", "scheduler", str),
                              work_location=work,
                              performance_report=_path_out(raw, "performance_report", base_dir))
    return executor  # checked once the command line had its say (with_executor)


def _path_out(raw: Mapping[str, Any], key: str, base_dir: Path) -> str | None:
    value = _opt(raw, "executor", key, str)
    return str((base_dir / Path(value).expanduser()).resolve()) if value else None


def check_executor(executor: ExecutorConfig, where: str = "executor.kind") -> None:
    if executor.kind != "dask":
        return
    if not executor.scheduler:
        raise ConfigError(f"{where}: dask needs a scheduler address (executor.scheduler "
                          "or --scheduler, e.g. tcp://10.0.0.5:8786)")
    if executor.work_location is None:
        raise ConfigError("executor.work_location: required with the dask executor (a local "
                          "path or s3:// prefix the client and every worker can reach)")


def with_secrets(feed: FeedConfig, env: Mapping[str, str]) -> FeedConfig:
    """The feed with its key (and IV) read again from `env` by variable name: how a Dask
    worker gets the secrets that never travel in a task."""
    where = f"feeds.{feed.name}"
    key = _secret(env, feed.key_env, f"{where}.key_env") if feed.key_env else None
    iv = (_secret(env, feed.iv_env, f"{where}.iv_env", lengths=(16,))
          if feed.iv_env else None)
    return replace(feed, key=key, iv=iv)


def without_secrets(feed: FeedConfig) -> FeedConfig:
    return replace(feed, key=None, iv=None)


def _check_export_targets(feeds: tuple[FeedConfig, ...],
                          dests: tuple[DestinationConfig, ...]) -> None:
    """An export feed needs somewhere to go: an aam_inbound destination with `audiences`."""
    exports = [f.name for f in feeds if f.kind == "campaign_export"]
    if exports and not any(d.kind == "aam_inbound" and d.audiences for d in dests):
        raise ConfigError(f"feeds.{exports[0]}.kind: campaign_export needs an aam_inbound "
                          "destination with an `audiences` table")


def _check_overlaps(state: Location, snapshot: Location, feeds: tuple[FeedConfig, ...],
                    dests: tuple[DestinationConfig, ...]) -> None:
    """Nothing the pipeline writes may land where it reads (feeds, the snapshot), and two
    writers (the state, each destination) never share a folder: outputs would be read back
    as input or replace each other's files (manifests are named by feed and delivery only)."""
    readers = [(f"feeds.{f.name}.source", f.source.url) for f in feeds]
    readers.append(("profiles.snapshot", snapshot.url))
    writers = [("state.location", state.url)] + [
        (f"destinations.{d.name}.target", d.target.url) for d in dests]
    for i, (key, url) in enumerate(writers):
        for other, other_url in readers + writers[:i]:
            if _overlap(_place(url), _place(other_url)):
                raise ConfigError(f"{key}: overlaps {other} ({url} and {other_url}); "
                                  "use separate folders")


def _place(url: str) -> tuple[str, str, str]:
    """(scheme, host, folder path ending in '/') of a location, normalized for comparison."""
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return "s3", bucket, "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
    if url.startswith("sftp://"):
        parts = urlsplit(url)
        path = posixpath.normpath("/" + unquote(parts.path).lstrip("/"))
        host = f"{parts.hostname or ''}:{parts.port or 22}"
        return "sftp", host, path.rstrip("/") + "/"
    path = unquote(urlsplit(url).path) if url.startswith("file://") else url
    return "file", "", str(Path(path).resolve()).rstrip("/") + "/"


def _overlap(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    return a[:2] == b[:2] and (a[2].startswith(b[2]) or b[2].startswith(a[2]))


def _name(raw: Mapping[str, Any], where: str) -> str:
    name: str = _req(raw, where, "name", str)
    if not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{where}.name: must be a plain name (letters, digits, '.', '_', "
                          "'-'; starting with a letter or digit; no '..'; at most 100 "
                          f"characters), got {name!r}")
    return name


def _feed(raw: Any, i: int, env: Mapping[str, str] | None, base_dir: Path,
          crm_column: str) -> FeedConfig:
    """`env` None: secrets are not read (their variables are still named and checked)."""
    where = f"feeds[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    _known(raw, where, {
        "name", "source", "kind", "known_hosts", "identity_file", "id_type", "id_kind",
        "id_encoding", "default_country", "decryption", "key_env", "iv_env",
        "max_reject_ratio", "require_info", "max_removal_ratio", "membership_retention_days",
        "match_column", "pgp_secret_key_file",
        "pgp_passphrase_env", "pgp_signer_key_file",
    })
    name = _name(raw, where)
    where = f"feeds.{name}"
    kind = _choice(raw, where, "kind", FEED_KINDS, "aam_segments")
    id_types = _choices(raw, where, "id_type", ID_TYPES, "declared")
    id_kinds = _choices(raw, where, "id_kind", ID_KINDS, "email")
    encoding = _choice(raw, where, "id_encoding", ENCODINGS, "plain")
    if id_types == ("ecid",) and encoding not in ("plain",):
        raise ConfigError(f"{where}.id_encoding: ECID feeds carry plain IDs, got {encoding!r}")
    ratio = _ratio(raw, where, "max_reject_ratio", 0.05)
    retention = _opt(raw, where, "membership_retention_days", int, 35)
    if retention < 1:
        raise ConfigError(f"{where}.membership_retention_days: must be a positive integer")
    decryption, key_env, key, iv, iv_env = None, None, None, None, None
    if encoding in ("encrypted", "auto") and kind == "aam_segments":
        decryption = _choice(raw, where, "decryption", ALGORITHMS, None)
        if decryption is None:
            raise ConfigError(f"{where}.decryption: required when id_encoding is {encoding!r}")
        key_env = _req(raw, where, "key_env", str)
        key = _secret(env, key_env, f"{where}.key_env") if env is not None else None
        iv_env = _opt(raw, where, "iv_env", str)
        if iv_env is not None:
            if decryption != "aes-cbc":
                raise ConfigError(f"{where}.iv_env: only used with decryption = 'aes-cbc'")
            if env is not None:
                iv = _secret(env, iv_env, f"{where}.iv_env", lengths=(16,))
    return FeedConfig(
        name=name,
        source=_location(raw, where, "source", base_dir),
        kind=kind,
        id_types=id_types,
        id_kinds=id_kinds,
        id_encoding=encoding,
        default_country=_country(_opt(raw, where, "default_country", str),
                                 f"{where}.default_country"),
        decryption=decryption,
        key_env=key_env,
        key=key,
        iv_env=iv_env,
        iv=iv,
        max_reject_ratio=ratio,
        require_info=bool(_opt(raw, where, "require_info", bool, True)),
        max_removal_ratio=_ratio(raw, where, "max_removal_ratio", 0.5),
        membership_retention_days=retention,
        match_column=_match_column(raw, where, kind, id_types, id_kinds, crm_column),
        **_feed_pgp(raw, where, env, base_dir),
    )


def _match_column(raw: Mapping[str, Any], where: str, kind: str, id_types: tuple[str, ...],
                  id_kinds: tuple[str, ...], crm_column: str) -> str | None:
    """The snapshot column a crm feed reconciles on; None when it is crm_id's own column."""
    name = _opt(raw, where, "match_column", str)
    if name is None:
        return None
    if kind != "aam_segments" or "declared" not in id_types or "crm" not in id_kinds:
        raise ConfigError(f"{where}.match_column: only for feeds with id_kind = 'crm'")
    if not name.strip():
        raise ConfigError(f"{where}.match_column: must be a snapshot column name")
    return None if name == crm_column else name


def _feed_pgp(raw: Mapping[str, Any], where: str, env: Mapping[str, str] | None,
              base_dir: Path) -> dict[str, Any]:
    """Key files are paths; the passphrase only comes from the environment variable named
    (`env` None: not read)."""
    secret = _key_file(raw, where, "pgp_secret_key_file", base_dir)
    signer = _key_file(raw, where, "pgp_signer_key_file", base_dir)
    passphrase_env = _opt(raw, where, "pgp_passphrase_env", str)
    passphrase = None
    if (passphrase_env or signer) and secret is None:
        needs = "pgp_passphrase_env" if passphrase_env else "pgp_signer_key_file"
        raise ConfigError(f"{where}.pgp_secret_key_file: required with {needs}")
    if passphrase_env is not None and env is not None:
        passphrase = env.get(passphrase_env)
        if passphrase is None:
            raise ConfigError(f"{where}.pgp_passphrase_env: environment variable "
                              f"{passphrase_env} is not set")
    return {"pgp_secret_key_file": secret, "pgp_passphrase": passphrase,
            "pgp_signer_key_file": signer}


def _key_file(raw: Mapping[str, Any], where: str, key: str, base_dir: Path) -> str | None:
    """A key file that exists and can be read (its contents are checked on import)."""
    value = _opt(raw, where, key, str)
    if value is None:
        return None
    path = (base_dir / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}.{key}: key file not found: {path}")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(f"{where}.{key}: cannot read key file {path} "
                          f"({exc.strerror or 'unreadable'})") from None
    return str(path)


def _destination(raw: Any, i: int, base_dir: Path) -> DestinationConfig:
    where = f"destinations[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    _known(raw, where, {
        "name", "kind", "target", "format", "dpid", "id", "segments", "audiences",
        "max_lines_per_file", "gzip", "known_hosts", "identity_file", "sse",
        "pgp_recipient_key_file",
    })
    name = _name(raw, where)
    where = f"destinations.{name}"
    kind = _choice(raw, where, "kind", DEST_KINDS, None)
    if kind is None:
        raise ConfigError(f"{where}.kind: required, one of {', '.join(DEST_KINDS)}")
    target = _location(raw, where, "target", base_dir)
    fmt = _choice(raw, where, "format", ("csv", "parquet"), "csv")
    max_lines = _opt(raw, where, "max_lines_per_file", int, 5_000_000)
    if max_lines < 1:
        raise ConfigError(f"{where}.max_lines_per_file: must be a positive integer")
    dest = DestinationConfig(
        name=name, kind=kind, target=target, format=fmt,
        id=_choice(raw, where, "id", DPUUID_IDS, "email_sha256"),
        max_lines_per_file=max_lines,
        gzip=bool(_opt(raw, where, "gzip", bool, False)),
        pgp_recipient_key_file=_key_file(raw, where, "pgp_recipient_key_file", base_dir),
    )
    if kind == "aam_inbound" and dest.gzip and dest.pgp_recipient_key_file:
        # Adobe: PGP already compresses; a PGP file that is also gzip'd is refused.
        raise ConfigError(f"{where}.gzip: must be false when pgp_recipient_key_file is set "
                          "(AAM refuses PGP files that are also gzip'd)")
    segments = raw.get("segments")
    if kind == "campaign_list":
        if segments is not None:
            if not isinstance(segments, list) or not all(_pos_int(s) for s in segments):
                raise ConfigError(f"{where}.segments: must be a list of positive segment IDs")
            for s in segments:
                _in_range(int(s), MAX_SEGMENT_ID, f"{where}.segments: segment ID")
            dest = _replace(dest, segment_filter=tuple(int(s) for s in segments))
        return dest
    if kind == "aam_inbound":
        dpid = _req(raw, where, "dpid", int)
        if dpid <= 0:
            raise ConfigError(f"{where}.dpid: must be a positive integer")
        _in_range(dpid, MAX_AAM_ID, f"{where}.dpid:")
        traits = _int_table(segments, f"{where}.segments", key_is_int=True) if segments else {}
        audiences = _int_table(raw.get("audiences"), f"{where}.audiences", key_is_int=False)
        if not traits and not audiences:
            raise ConfigError(f"{where}.segments: required (segment ID -> trait ID table)")
        return _replace(dest, dpid=dpid, traits=traits, audiences=audiences)
    # no_profile_contacts carries PII: only encrypted-at-rest targets are allowed.
    url = target.url
    if url.startswith("s3://") and not target.options.sse and not dest.pgp_recipient_key_file:
        raise ConfigError(f"{where}.sse: required for no_profile_contacts on S3 (PII at rest)")
    if not url.startswith(("s3://", "sftp://")):
        raise ConfigError(f"{where}.target: no_profile_contacts must go to SFTP or S3 with sse")
    return dest


def _replace(dest: DestinationConfig, **changes: Any) -> DestinationConfig:
    return replace(dest, **changes)


def _location(raw: Mapping[str, Any], where: str, key: str, base_dir: Path) -> Location:
    url = _req(raw, where, key, str)
    if not url.strip():
        raise ConfigError(f"{where}.{key}: must not be empty")
    if url.startswith("sftp://"):
        if "@" not in url.split("://", 1)[1].split("/", 1)[0]:
            raise ConfigError(f"{where}.{key}: SFTP URL needs a user (sftp://user@host:port/path)")
        for needed in ("known_hosts", "identity_file"):
            if not raw.get(needed):
                raise ConfigError(f"{where}.{needed}: required for an SFTP location")
    elif "://" in url and not url.startswith(("s3://", "file://")):
        raise ConfigError(f"{where}.{key}: unsupported URL scheme in {url!r}")
    elif "://" not in url:
        url = str((base_dir / Path(url).expanduser()).resolve())
    options = StoreOptions(
        known_hosts=_path_opt(raw, where, "known_hosts", base_dir),
        identity_file=_path_opt(raw, where, "identity_file", base_dir),
        sse=_choice(raw, where, "sse", ("AES256", "aws:kms"), None),
    )
    return Location(url=url, options=options)


def _path_opt(raw: Mapping[str, Any], where: str, key: str, base_dir: Path) -> str | None:
    value = _opt(raw, where, key, str)
    if value is None:
        return None
    path = (base_dir / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}.{key}: file not found: {path}")
    return str(path)


def _secret(env: Mapping[str, str], name: str, where: str,
            lengths: tuple[int, ...] = (16, 24, 32)) -> bytes:
    from pipeline.identity import load_key

    value = env.get(name)
    if not value:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    try:
        key = load_key(value)
    except ConfigError:
        raise ConfigError(
            f"{where}: environment variable {name} must hold hex or Base64 of "
            f"{'/'.join(map(str, lengths))} bytes"
        ) from None
    if len(key) not in lengths:
        raise ConfigError(f"{where}: environment variable {name} must hold {lengths[0]} bytes")
    return key


def _country(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    if len(value) != 2 or not value.isalpha():
        raise ConfigError(f"{where}: must be an ISO-3166 alpha-2 code, got {value!r}")
    return value.upper()


def _int_table(value: Any, where: str, key_is_int: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    out: dict = {}
    for k, v in value.items():
        if key_is_int and not _pos_int(k):
            raise ConfigError(f"{where}: key {k!r} is not a positive segment ID")
        if key_is_int:
            _in_range(int(k), MAX_SEGMENT_ID, f"{where}: segment ID")
        if not _pos_int(v):
            raise ConfigError(f"{where}.{k}: trait ID must be a positive integer")
        _in_range(int(v), MAX_AAM_ID, f"{where}.{k}: trait ID")
        out[int(k) if key_is_int else str(k)] = int(v)
    return out


def _in_range(value: int, top: int, what: str) -> None:
    if not 1 <= value <= top:
        raise ConfigError(f"{what} {value} out of range (1..{top})")


def _pos_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return isinstance(value, str) and value.isdigit() and int(value) > 0


def _known(raw: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}: unknown key")


def _table(raw: Mapping[str, Any], key: str, required: bool) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key}: required table [{key}] is missing")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table")
    return value


def _array(raw: Mapping[str, Any], key: str) -> list:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
    return value


def _unique(names: list[str], where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{where}.{name}: duplicate name")
        seen.add(name)


def _req(raw: Mapping[str, Any], where: str, key: str, typ: Any) -> Any:
    if key not in raw:
        raise ConfigError(f"{where}.{key}: required")
    return _opt(raw, where, key, typ)


def _ratio(raw: Mapping[str, Any], where: str, key: str, default: float) -> float:
    value = _opt(raw, where, key, (int, float))
    ratio = default if value is None else float(value)
    if not 0 <= ratio <= 1:
        raise ConfigError(f"{where}.{key}: must be between 0 and 1")
    return ratio


def _opt(raw: Mapping[str, Any], where: str, key: str, typ: Any, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) and typ is not bool:
        raise ConfigError(f"{where}.{key}: wrong type (bool)")
    if not isinstance(value, typ):
        raise ConfigError(f"{where}.{key}: wrong type ({type(value).__name__})")
    return value


def _choices(raw: Mapping[str, Any], where: str, key: str, choices: tuple,
             default: str) -> tuple[str, ...]:
    """A choice or a list of choices (feeds that mix ID kinds); kept in a stable order."""
    value = raw.get(key, default)
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v in choices for v in values):
        raise ConfigError(f"{where}.{key}: must be one of {', '.join(choices)} or a list of "
                          f"them, got {value!r}")
    return tuple(c for c in choices if c in values)


def _choice(raw: Mapping[str, Any], where: str, key: str, choices: tuple, default: Any) -> Any:
    value = _opt(raw, where, key, str, default)
    if value is not None and value not in choices:
        raise ConfigError(f"{where}.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value
