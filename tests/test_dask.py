"""Scale-out on Dask (SPEC §13): a real cluster on 127.0.0.1 — `dask scheduler` and two
`dask worker` processes — runs the same deliveries as the local executor, with the same
outputs and counts, on a local or an S3 work location, through a lost worker and a lost
scheduler."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from localdev.generate import KEY_ENV as GENERATED_KEY_ENV
from localdev.generate import GenerateSpec, demo_key, generate
from pipeline.cli import main
from pipeline.config import FeedConfig, Location, without_secrets
from pipeline.executors import dask as dask_executor
from pipeline.flows import aam
from pipeline.stores import StoreOptions, open_store
from tests import test_e2e as e2e
from tests import test_resolution_e2e as mixed
from tests.cluster import Cluster, free_port, local_cluster
from tests.factories import delivery_files, put_all, write_snapshot

KEY_ENV = {"DECLARED_ID_KEY": mixed.KEY.hex(), GENERATED_KEY_ENV: demo_key(1).hex()}
COUNTS = ("records_received", "format_errors", "invalid_ids", "decrypt_failures", "matched",
          "unmatched", "suppressed", "rows_written", "unmapped_segments", "missing_ids",
          "outputs")
RUNNER = Path(__file__).with_name("dask_runner.py")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint) -> Cluster:
    """Shared by the tests that do not break it; workers see the feed key and moto's S3."""
    with local_cluster(tmp_path_factory.mktemp("dask-logs"), KEY_ENV) as running:
        _record_task_stream(running.address)
        yield running


# --- the end-to-end case: SFTP + S3 feeds, every ID kind and encoding ------------------------


def e2e_config(tmp: Path, sftp, s3_source: str, contacts: str, inbound: str,
               work: str) -> Path:
    """test_e2e's split delivery on SFTP + test_resolution_e2e's mixed one on S3."""
    path = tmp / "pipeline.toml"
    path.write_text(f"""
[state]
location = "{tmp}/state"
[profiles]
snapshot = "{tmp}/profiles/snapshot.parquet"
default_country = "FR"
[executor]
work_location = "{work}"
[[feeds]]
name = "emails"
source = "{sftp.url}/dask-{tmp.parent.name}-{tmp.name}"
known_hosts = "{sftp.known_hosts}"
identity_file = "{sftp.identity_file}"
id_kind = "email"
max_reject_ratio = 0.5
[[feeds]]
name = "mixed"
source = "{s3_source}"
id_type = ["ecid", "declared"]
id_kind = ["email", "phone"]
id_encoding = "auto"
decryption = "aes-gcm"
key_env = "DECLARED_ID_KEY"
max_reject_ratio = 0.5
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{tmp}/out/campaign"
[[destinations]]
name = "campaign-111"
kind = "campaign_list"
target = "{tmp}/out/campaign-111"
format = "parquet"
segments = [111]
[[destinations]]
name = "experience-cloud"
kind = "aam_inbound"
target = "{inbound}"
dpid = 12345
id = "email_sha256"
segments = {{ "111" = 9001, "112" = 9002, "113" = 9003 }}
gzip = true
[[destinations]]
name = "contacts"
kind = "no_profile_contacts"
target = "{contacts}"
sse = "AES256"
""")
    return path


def e2e_setup(tmp: Path, sftp_server, make_bucket, work: str) -> Path:
    sftp_folder = f"{sftp_server.url}/dask-{tmp.parent.name}-{tmp.name}"
    opts = StoreOptions(known_hosts=sftp_server.known_hosts,
                        identity_file=sftp_server.identity_file)
    store = open_store(sftp_folder, opts)
    put_all(store, delivery_files(e2e.ROOT, e2e.SPLITS), folder="date=2017-02-03")
    store.close()
    source = f"s3://{make_bucket()}/outbound/"
    store = open_store(source)
    put_all(store, delivery_files(mixed.ROOT, mixed.SPLITS))
    store.close()
    write_snapshot(tmp / "profiles" / "snapshot.parquet", mixed.PROFILES + e2e.PROFILES[3:])
    bucket = make_bucket()
    return e2e_config(tmp, sftp_server, source, f"s3://{bucket}/contacts/",
                      f"s3://{bucket}/inbound/", work)


@pytest.mark.parametrize("work", ["local", "s3"])
def test_e2e_on_cluster_matches_local(work, cluster, sftp_server, make_bucket, tmp_path,
                                      capsys, monkeypatch):
    monkeypatch.setattr(aam, "LINES_PER_BUCKET", 4)  # several buckets: several tasks
    runs = {}
    for executor in ("local", "dask"):
        tmp = tmp_path / executor
        location = str(tmp / "work") if work == "local" else f"s3://{make_bucket()}/work"
        config = e2e_setup(tmp, sftp_server, make_bucket, location)
        args = ["--executor", executor]
        if executor == "dask":
            args += ["--scheduler", cluster.address]
        code = main(["run", "--config", str(config), "--json", *args], env=KEY_ENV)
        runs[executor] = (code, json.loads(capsys.readouterr().out), published(tmp))

    (code, local, local_files), (dask_code, remote, remote_files) = runs.values()
    assert code == dask_code == 0
    assert [_counts(d) for d in remote["deliveries"]] == [_counts(d) for d in
                                                          local["deliveries"]]
    assert [d["status"] for d in remote["deliveries"]] == ["processed", "processed"]
    assert remote["deliveries"][1]["records_received"] == mixed.MIXED_TOTALS["records_received"]
    # campaign lists (CSV, Parquet), AAM inbound and contacts with manifests, quarantine
    assert remote_files == local_files and len(local_files) == 18
    golden = {f"out/campaign/mixed/{mixed.ROOT}.csv": "resolution_campaign.csv",
              f"s3/contacts/mixed/{mixed.ROOT}.csv": "resolution_contacts.csv"}
    for name, gold in golden.items():  # test_resolution_e2e's goldens (rows in bucket order)
        expected = (mixed.GOLDEN / gold).read_bytes().splitlines()
        assert sorted(remote_files[name].splitlines()) == sorted(expected)

    tasks = remote["executor"]["tasks"]
    assert remote["executor"]["kind"] == "dask" and local["executor"]["kind"] == "local"
    assert tasks == local["executor"]["tasks"] == sum(d["tasks"] for d in remote["deliveries"])
    assert sum(remote["executor"]["workers"].values()) == tasks
    ran = _task_stream(cluster.address, remote["executor"])
    assert set(ran) == set(remote["executor"]["workers"]) and len(ran) == 2, ran
    if work == "s3":  # nothing left behind in the work location
        bucket = location.removeprefix("s3://").split("/")[0]
        assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def published(tmp: Path) -> dict[str, bytes]:
    """Every output and quarantine file of a run, local or on S3 (names relative)."""
    files = {str(p.relative_to(tmp)): p.read_bytes()
             for sub in ("out", "state/quarantine") for p in (tmp / sub).rglob("*")
             if p.is_file()}
    config = (tmp / "pipeline.toml").read_text()
    for url in {line.split('"')[1] for line in config.splitlines()
                if line.startswith("target = \"s3://")}:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        s3 = boto3.client("s3")
        for obj in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
            name = f"s3/{obj['Key']}"
            files[name] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return files


def _counts(d: dict) -> dict:
    return {k: d[k] for k in COUNTS}


def _record_task_stream(address: str) -> None:
    """Asking once makes the scheduler keep its task stream from now on."""
    from distributed import Client

    with Client(address, timeout="20s") as client:
        client.get_task_stream()


def _task_stream(address: str, executor: dict) -> dict[str, int]:
    """The scheduler's own record: tasks of the pipeline per worker address."""
    from distributed import Client

    names = ("ingest_split", "match_bucket", "merge_bucket")
    with Client(address, timeout="20s") as client:
        stream = client.get_task_stream()
    out: dict[str, int] = {}
    for record in stream:
        if str(record["key"]).startswith(names):
            out[record["worker"]] = out.get(record["worker"], 0) + 1
    return out


# --- a generated case: 200k lines, three feeds, ten key and profile buckets -----------------

GENERATED_CONFIG = """
[state]
location = "{run}/state"
[profiles]
snapshot = "{data}/profiles/snapshot.parquet"
default_country = "FR"
[executor]
work_location = "{run}/work"
[[feeds]]
name = "emails"
source = "{data}/feeds/email"
id_kind = "email"
id_encoding = "auto"
decryption = "aes-gcm"
key_env = "{key_env}"
[[feeds]]
name = "phones"
source = "{data}/feeds/phone"
id_kind = "phone"
[[feeds]]
name = "ecids"
source = "{data}/feeds/ecid"
id_type = "ecid"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{run}/out/campaign"
[[destinations]]
name = "experience-cloud"
kind = "aam_inbound"
target = "{run}/out/aam"
dpid = 12345
id = "email_sha256"
segments = {{ "111" = 9001, "112" = 9002, "113" = 9003 }}
gzip = true
"""
GENERATED_BUCKET_LINES = "20000"  # 200k lines -> 10 key buckets and 10 profile buckets
EMAILS_ROOT = "ftp_5000_6001_iter_1764000001000"


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """The data, and what the local executor makes of it (outputs, report)."""
    root = tmp_path_factory.mktemp("generated")
    info = generate(root / "data", GenerateSpec(lines=200_000, profiles=20_000, files=2))
    env = {info["key_env"]: info["key_hex"]}
    local = run_generated(root / "local", root / "data", env, "--executor", "local")
    assert local.code == 0, local.stderr
    return {"root": root, "env": env, "local": local}


class Run:
    def __init__(self, run: Path, proc: subprocess.CompletedProcess) -> None:
        self.code, self.stderr = proc.returncode, proc.stderr
        self.report = json.loads(proc.stdout) if proc.stdout.strip() else None
        self.files = {str(p.relative_to(run)): p.read_bytes()
                      for sub in ("out", "state/quarantine") for p in (run / sub).rglob("*")
                      if p.is_file()}


def generated_config(run: Path, data: Path, env: dict) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "pipeline.toml"
    path.write_text(GENERATED_CONFIG.format(run=run, data=data, key_env=next(iter(env))))
    return path


def start_generated(run: Path, data: Path, env: dict, *args: str) -> subprocess.Popen:
    config = generated_config(run, data, env)
    cmd = [sys.executable, str(RUNNER), GENERATED_BUCKET_LINES, "run", "--config",
           str(config), "--json", *args]
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(run: Path, proc: subprocess.Popen) -> Run:
    out, err = proc.communicate(timeout=240)
    return Run(run, subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


def run_generated(run: Path, data: Path, env: dict, *args: str) -> Run:
    return finish(run, start_generated(run, data, env, *args))


def assert_same_as_local(remote: Run, local: Run) -> None:
    assert remote.code == 0, remote.stderr
    assert remote.files == local.files and len(local.files) == 15
    assert [_counts(d) for d in remote.report["deliveries"]] == [
        _counts(d) for d in local.report["deliveries"]]
    assert remote.report["totals"]["records_received"] > 240_000 * 0.98


def test_generated_200k_on_cluster_matches_local(generated, cluster):
    root, local = generated["root"], generated["local"]

    remote = run_generated(root / "dask", root / "data", generated["env"],
                           "--executor", "dask", "--scheduler", cluster.address)

    assert_same_as_local(remote, local)
    executor = remote.report["executor"]
    # emails: 2 split files + 10 key buckets + 10 profile buckets; phones and ECIDs: 2 + 1 + 1
    assert executor["tasks"] == local.report["executor"]["tasks"] == 22 + 4 + 4
    assert len(executor["workers"]) == 2 and min(executor["workers"].values()) > 0


def test_local_executor_does_not_import_dask(tmp_path):
    """`local` is the default and runs without Dask: not even imported."""
    info = generate(tmp_path / "data", GenerateSpec(lines=2000, profiles=500, files=2))
    env = {info["key_env"]: info["key_hex"]}
    config = generated_config(tmp_path / "run", tmp_path / "data", env)
    code = ("import sys; from pipeline.cli import main; "
            f"code = main(['run', '--config', {str(config)!r}, '--json']); "
            "assert code == 0, code; "
            "print('DASK', sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'distributed')), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    # per feed: 2 split files, 1 key bucket, 1 profile bucket
    assert json.loads(proc.stdout)["executor"] == {"kind": "local", "tasks": 12}
    assert proc.stderr.splitlines()[-1] == "DASK []"


# --- failures: a worker lost, the scheduler lost ---------------------------------------------


def wait_for_task(cluster: Cluster, prefix: str, worker: str | None = None,
                  timeout: float = 120) -> str:
    """Block until a task named `prefix…` runs (on the worker named `worker`, if given)."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    with Client(cluster.address, timeout="20s") as client:
        names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
        while time.monotonic() < deadline:
            for addr, keys in client.processing().items():
                if worker in (None, names.get(addr)) and any(
                        str(k).startswith(prefix) for k in keys):
                    return addr
            time.sleep(0.02)
    raise TimeoutError(f"no {prefix} task ran")


def test_worker_killed_mid_run_still_gives_local_outputs(generated, tmp_path):
    root = generated["root"]
    with local_cluster(tmp_path / "logs", KEY_ENV) as cluster:
        proc = start_generated(tmp_path / "run", root / "data", generated["env"],
                               "--executor", "dask", "--scheduler", cluster.address)
        victim = wait_for_task(cluster, "match_bucket", worker="w0")
        cluster.workers[0].kill()  # SIGKILL, mid pass 2: its task and results are lost
        remote = finish(tmp_path / "run", proc)

    assert cluster.workers[0].wait() == -9
    assert_same_as_local(remote, generated["local"])
    workers = remote.report["executor"]["workers"]  # who returned each result
    assert remote.report["executor"]["tasks"] == sum(workers.values()) == 30
    survivor = next(w for w in workers if w != victim)
    assert workers[survivor] > workers.get(victim, 0)  # the rest ran on the survivor


def test_scheduler_killed_fails_cleanly_then_next_run_completes(generated, tmp_path):
    root, run = generated["root"], tmp_path / "run"
    with local_cluster(tmp_path / "logs", KEY_ENV) as cluster:
        proc = start_generated(run, root / "data", generated["env"],
                               "--executor", "dask", "--scheduler", cluster.address)
        wait_for_task(cluster, "match_bucket")
        cluster.kill_scheduler()
        failed = finish(run, proc)

        # Which error the client sees first (cancelled futures or the closed comm) is timing.
        line = re.escape(f"feed emails, delivery {EMAILS_ROOT}: lost the Dask scheduler at "
                         f"{cluster.address} (") + r"(FutureCancelledError|CommClosedError)" \
            + re.escape("): run stopped, the delivery in progress was not published")
        assert failed.code == 1 and re.fullmatch(line, failed.report["error"])
        assert re.fullmatch(f"error: {line}", failed.stderr.splitlines()[-1])
        assert "Traceback" not in failed.stderr
        assert not [f for f in failed.files if f.startswith("out/")]  # nothing published
        assert not list((run / "state" / "ledger").rglob("*.json"))

        for proc_ in cluster.workers:  # the operator restarts the cluster on the same port
            proc_.kill()
            proc_.wait()
        cluster.workers.clear()
        cluster.start_scheduler()
        cluster.start_worker()
        cluster.start_worker()
        cluster.wait_for_workers(2)
        again = run_generated(run, root / "data", generated["env"],
                              "--executor", "dask", "--scheduler", cluster.address)

    assert_same_as_local(again, generated["local"])


# --- secrets stay on the machines that hold them ---------------------------------------------


def test_tasks_carry_the_key_variable_name_not_the_key():
    key = mixed.KEY
    feed = FeedConfig(name="f", source=Location("in"), id_encoding="encrypted",
                      decryption="aes-cbc", key_env="K", key=key, iv_env="IV", iv=b"i" * 16)
    setup = aam.Setup(without_secrets(feed), Location("/work"), "FR", 4)
    shipped = pickle.dumps(setup)
    assert key not in shipped and key.hex().encode() not in shipped and b"i" * 16 not in shipped
    with setup.open({"K": key.hex(), "IV": (b"i" * 16).hex()}) as res:
        assert res.feed.key == key and res.feed.iv == b"i" * 16


def test_worker_without_the_key_variable_fails_the_run_in_one_line(tmp_path):
    info = generate(tmp_path / "data", GenerateSpec(lines=2000, profiles=500, files=2))
    env = {info["key_env"]: info["key_hex"]}  # the client has it, the worker does not
    with local_cluster(tmp_path / "logs", workers=1) as cluster:
        proc = start_generated(tmp_path / "run", tmp_path / "data", env, "--executor", "dask",
                               "--scheduler", cluster.address)
        failed = finish(tmp_path / "run", proc)
    assert failed.code == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.splitlines()[-1].startswith(
        f"error: feed emails, delivery {EMAILS_ROOT}: on Dask worker tcp://127.0.0.1:")
    assert failed.stderr.splitlines()[-1].endswith(
        f"feeds.emails.key_env: environment variable {info['key_env']} is not set")
    assert info["key_hex"] not in failed.stderr
    assert not [f for f in failed.files if f.startswith("out/")]


# --- configuration and command line ----------------------------------------------------------


@pytest.mark.parametrize("table, message", [
    ('kind = "dask"\nwork_location = "w"',
     "executor.kind: dask needs a scheduler address (executor.scheduler or --scheduler, "
     "e.g. tcp://10.0.0.5:8786)"),
    ('kind = "dask"\nscheduler = "tcp://127.0.0.1:8786"',
     "executor.work_location: required with the dask executor (a local path or s3:// prefix "
     "the client and every worker can reach)"),
    ('kind = "spark"', "executor.kind: must be one of local, dask, got 'spark'"),
    ('workers = 3', "executor.workers: unknown key"),
    ('work_location = "sftp://u@h:22/w"',
     "executor.work_location: must be a local path or s3:// (workers write their "
     "intermediate files there)"),
])
def test_executor_table_is_checked(tmp_path, capsys, table, message):
    config = tmp_path / "c.toml"
    config.write_text(f'[state]\nlocation = "s"\n[profiles]\nsnapshot = "p"\n[executor]\n{table}\n')
    assert main(["run", "--config", str(config)], env={}) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_command_line_executor_wins_over_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dask_executor, "CONNECT_TIMEOUT", "1s")
    info = generate(tmp_path / "data", GenerateSpec(lines=200, profiles=50, files=1))
    env = {info["key_env"]: info["key_hex"]}
    config = generated_config(tmp_path / "run", tmp_path / "data", env)  # no kind: local
    text = config.read_text().replace("[executor]\n", "[executor]\nkind = \"local\"\n")
    config.write_text(text)
    closed = f"tcp://127.0.0.1:{free_port()}"

    code = main(["run", "--config", str(config), "--executor", "dask", "--scheduler", closed],
                env=env)

    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: feed emails, delivery {EMAILS_ROOT}: cannot reach the Dask scheduler at "
        f"{closed} (OSError)")
    assert main(["run", "--config", str(config), "--json"], env=env) == 0  # local, as set
    assert json.loads(capsys.readouterr().out)["executor"]["kind"] == "local"
