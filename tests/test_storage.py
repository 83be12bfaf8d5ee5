"""Run storage on a local folder and on a real S3 API (moto's server on loopback): file operations, the write check
that stops a sweep before anything starts, the default under ``ray job submit``, and the buffer's journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import S3Server, expert_trajectories

from anyorder_ray import storage
from anyorder_ray.config import load_config
from anyorder_ray.roles.buffer import BufferJournal, BufferState, JournalRecord
from anyorder_ray.storage import Location, StorageError, check_writable

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "tune_configs" / "smoke.yaml"


@pytest.fixture
def aws_env(monkeypatch, s3_server):
    """This process talks to the test server with its credentials (filesystems are cached per process: cleared)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    return s3_server


def _bucket(server: S3Server, name: str) -> str:
    server.client().create_bucket(Bucket=name)
    return name


# -- naming ----------------------------------------------------------------------------------------------------


def test_paths_and_uris_parse_into_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.parse("runs") == Location("", str(tmp_path / "runs"))  # relative: made absolute
    assert Location.parse(f"file://{tmp_path}/a") == Location("", str(tmp_path / "a"))
    uri = "s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http"
    loc = Location.parse(uri)
    assert (loc.scheme, loc.path, loc.query) == ("s3", "bucket/runs", "endpoint_override=127.0.0.1:9000&scheme=http")
    child = loc.child("sweep-1", "results.md")
    assert child.uri == "s3://bucket/runs/sweep-1/results.md?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (child.name, child.parent.parent) == ("results.md", loc)
    assert loc.ray_storage()[0] == "bucket/runs"  # Ray gets the path without the scheme, with the filesystem
    with pytest.raises(StorageError, match="names no bucket"):
        Location.parse("s3://")


# -- file operations -------------------------------------------------------------------------------------------


def _round_trip(root: Location) -> None:
    assert not root.exists() and root.list() == []
    root.child("a.txt").write_text("one")
    root.child("a.txt").write_text("two")  # replaced whole
    root.child("log.jsonl").append_text('{"x": 1}\n')
    root.child("log.jsonl").append_text('{"x": 2}\n')
    assert root.child("a.txt").read_text() == "two"
    assert [json.loads(line)["x"] for line in root.child("log.jsonl").read_text().splitlines()] == [1, 2]
    with root.child("stage").staged() as out:
        (out / "results.md").write_text("| table |")
        (out / "plots").mkdir()
        (out / "plots" / "p.png").write_bytes(b"\x89PNG")
    assert root.child("stage", "plots", "p.png").read_bytes() == b"\x89PNG"
    assert {loc.name for loc in root.list()} == {"a.txt", "log.jsonl", "stage"}
    assert root.child("a.txt").is_file() and not root.child("stage").is_file()
    root.child("stage").delete()
    assert not root.child("stage").exists()


def test_a_local_folder_round_trips(tmp_path):
    _round_trip(Location.parse(tmp_path / "runs"))


def test_an_s3_prefix_round_trips(aws_env):
    _round_trip(Location.parse(aws_env.uri(_bucket(aws_env, "round-trip"), "runs")))


def test_the_write_check_leaves_nothing_behind(tmp_path, aws_env):
    check_writable(Location.parse(tmp_path / "new" / "deeper"))
    assert list(tmp_path.iterdir()) == []  # the folders it had to create are gone again
    bucket = _bucket(aws_env, "write-check")
    check_writable(Location.parse(aws_env.uri(bucket, "a/b/runs")))
    assert aws_env.keys(bucket) == []  # no probe, no folder marker objects


# -- storage that cannot be used stops the sweep before anything is written -------------------------------------


def _sweep_exit(storage_path: str, capsys) -> tuple[int, str]:
    from anyorder_ray import sweep

    code = sweep.main(["--config", str(SMOKE), "--name", "never", f"sweep.storage_path={storage_path}"])
    return code, capsys.readouterr().err


def test_a_local_storage_path_that_cannot_be_created_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    code, err = _sweep_exit(str(tmp_path / "file" / "runs"), capsys)
    assert code == 2 and f"cannot write to storage {tmp_path / 'file' / 'runs'}" in err
    assert "Pick a folder you can write to" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("s4://bucket/runs", "Unrecognized filesystem type in URI"),
     ("s3://bucket/runs?endpont_override=127.0.0.1:9", "Unexpected query parameter in S3 URI: 'endpont_override'")],
    ids=["scheme", "option"],
)  # fmt: skip
def test_a_misspelt_uri_is_refused(uri, expected, capsys):
    code, err = _sweep_exit(uri, capsys)
    assert code == 2 and expected in err and "Check the URI" in err


def test_a_misspelt_bucket_is_refused(aws_env, capsys):
    _bucket(aws_env, "real-bucket")
    code, err = _sweep_exit(aws_env.uri("reel-bucket", "runs"), capsys)
    assert code == 2 and aws_env.uri("reel-bucket", "runs") in err
    assert "The bucket does not exist: create it, or fix its name" in err
    assert aws_env.keys("real-bucket") == []


@pytest.fixture(scope="module")
def iam_server():
    """An S3 API that enforces IAM (as real S3 does): a bucket ``read-only`` and a user allowed only to read it."""
    server = S3Server(enforce_auth=True)
    try:
        admin = {"aws_access_key_id": "AKIAADMINEXAMPLE0000", "aws_secret_access_key": "admin"}
        server.client(**admin).create_bucket(Bucket="read-only")
        iam = server.client("iam", **admin)
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17",
                  "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]  # the 4th unauthenticated call: IAM from here on
        server.reader = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        yield server
    finally:
        server.stop()


def _objects(server: S3Server, bucket: str) -> int:
    reader = server.client(aws_access_key_id=server.reader["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=server.reader["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    return reader.list_objects_v2(Bucket=bucket)["KeyCount"]


@pytest.mark.slow  # moto answers unsigned uploads with internal errors that the S3 client retries (~20 s)
def test_missing_credentials_are_named(iam_server, monkeypatch, capsys):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.aws/credentials either
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # not on EC2: no instance role to wait ~20 s for
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    code, err = _sweep_exit(iam_server.uri("read-only", "runs"), capsys)
    assert code == 2 and iam_server.uri("read-only", "runs") in err
    assert "No AWS credentials were found in the environment: set AWS_ACCESS_KEY_ID" in err
    assert _objects(iam_server, "read-only") == 0


def test_credentials_that_may_only_read_are_refused(iam_server, monkeypatch, capsys):
    for key, value in iam_server.reader.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    code, err = _sweep_exit(iam_server.uri("read-only", "runs"), capsys)
    assert code == 2 and "ACCESS_DENIED" in err and "Access denied" in err and "grant write access" in err
    assert _objects(iam_server, "read-only") == 0


@pytest.mark.slow
def test_an_unreachable_endpoint_is_refused(aws_env, capsys):
    """Nothing listens on the port: the S3 client's retries run out (~20 s), then the sweep says what to check."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"s3://bucket/runs?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    code, err = _sweep_exit(uri, capsys)
    assert code == 2 and uri in err and "The storage endpoint cannot be reached" in err


# -- where runs go ---------------------------------------------------------------------------------------------


def test_a_submitted_job_keeps_a_relative_output_dir_outside_its_working_dir(tmp_path, monkeypatch):
    from anyorder_ray.sweep import storage_root

    cfg = load_config(SMOKE)
    assert storage_root(cfg) == (Location.parse(Path("runs").resolve()), None)  # a plain run: relative to the CWD
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the entrypoint
    monkeypatch.setenv("ANYORDER_RAY_HOME", str(tmp_path / "home"))
    root, note = storage_root(cfg)
    assert root == Location.parse(tmp_path / "home" / "runs")
    assert "working directory is deleted when it ends" in note and "sweep.storage_path" in note
    absolute = load_config(SMOKE, [f"train.output_dir={tmp_path / 'mine'}"])
    assert storage_root(absolute) == (Location.parse(tmp_path / "mine"), None)  # an absolute path is the user's
    shared = load_config(SMOKE, ["sweep.storage_path=s3://team/runs"])
    assert storage_root(shared) == (Location.parse("s3://team/runs"), None)


# -- the buffer's journal --------------------------------------------------------------------------------------


def _replay(journal: BufferJournal, capacity: int, target: int | None) -> BufferState:
    state = BufferState(capacity, target=target)
    for record in journal.records():
        state.add(record.trajectories, len(record.trajectories), record.worker, record.next_seed)
    return state


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_replayed_journal_rebuilds_the_buffer_state(where, tmp_path, request):
    """Every accepted batch is journaled; replaying the journal gives the same contents, counters and resume seeds
    as the state that acknowledged them (eviction and the fixed-budget trim happen again, identically)."""
    if where == "s3":
        server = request.getfixturevalue("aws_env")
        loc = Location.parse(server.uri(_bucket(server, "journal"), "trial/trajectories"))
    else:
        loc = Location.parse(tmp_path / "trajectories")
    trajectories = expert_trajectories("BabyAI-GoToRedBallGrey-v0", range(12))
    for capacity, target in ((8, None), (12, 10)):
        journal = BufferJournal(loc.child(f"{capacity}-{target}"))
        live = BufferState(capacity, target=target)
        for worker, lo in ((0, 0), (1, 100), (0, 4), (0, 4), (1, 104), (0, 8)):  # (0, 4) twice: a repeat
            batch = trajectories[lo % 100 : lo % 100 + 4]
            accepting = live.wants_more() and not live.is_repeat(worker, lo + 4)  # as TrajectoryBuffer.add does
            journal.append(JournalRecord(worker, lo + 4, batch if accepting else []))
            live.add(batch, len(batch), worker, lo + 4)
        replayed = _replay(BufferJournal(journal.where), capacity, target)
        assert replayed.snapshot() == live.snapshot() and replayed.stats() == live.stats()
        assert [replayed.resume_seed(w) for w in (0, 1)] == [live.resume_seed(w) for w in (0, 1)]
        reopened = BufferJournal(journal.where)
        reopened.append(JournalRecord(0, 13, trajectories[:1]))  # numbering continues after a reopen
        assert [r.next_seed for r in BufferJournal(journal.where).records()] == [4, 104, 8, 8, 108, 12, 13]
