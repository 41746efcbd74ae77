"""ObjectStore against a real S3-speaking server on loopback (moto's server mode) and local paths:
directories round-trip with sha256 verification, tampering is caught, and a dead endpoint or wrong
credentials end in one readable KatError."""

import json
import socket

import pytest

from kat_core.errors import KatError
from kat_core.platform.storage import INDEX, ObjectStore

POLICY = json.dumps({"Version": "2012-10-17",
                     "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


@pytest.fixture(scope="module")
def s3():
    """A moto server with IAM auth switched on: one user whose key may use S3, every other key is refused."""
    import boto3
    import moto.settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="kat")
    iam.put_user_policy(UserName="kat", PolicyName="s3", PolicyDocument=POLICY)
    key = iam.create_access_key(UserName="kat")["AccessKey"]
    saved = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from here on every request is authenticated
    try:
        yield {"endpoint": endpoint, "access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
        server.stop()


def store(s3, **kw) -> ObjectStore:
    args = {"endpoint": s3["endpoint"], "access_key": s3["access_key"], "secret_key": s3["secret_key"],
            "region": "us-east-1", "attempts": 2, "backoff_s": 0.05, **kw}
    return ObjectStore(**args)


def make_tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 100)
    (root / "sub" / "deeper" / "c.json").write_text('{"c": 1}\n')
    return {"a.txt", "sub/b.bin", "sub/deeper/c.json"}


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != INDEX}


def test_s3_roundtrip_verified(s3, tmp_path):
    src = tmp_path / "src"
    names = make_tree(src)
    st = store(s3)
    index = st.upload_dir(src, "s3://kat-test/runs/r1/ckpt")
    assert set(index) == names and all(len(d) == 64 for d in index.values())
    assert st.exists("s3://kat-test/runs/r1/ckpt") and not st.exists("s3://kat-test/runs/r1/other")

    out = st.download_dir("s3://kat-test/runs/r1/ckpt", tmp_path / "dl")
    assert files_of(out) == files_of(src)
    # each object carries its own digest as metadata too
    meta = st._client().stat_object("kat-test", "runs/r1/ckpt/a.txt").metadata
    assert meta.get("x-amz-meta-sha256") == index["a.txt"]


def test_reupload_replaces_and_drops_stale_files(s3, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    st = store(s3)
    st.upload_dir(src, "s3://kat-test/runs/r2")
    (src / "a.txt").unlink()
    (src / "new.txt").write_text("new\n")
    st.upload_dir(src, "s3://kat-test/runs/r2")
    keys = {o.object_name for o in st._client().list_objects("kat-test", prefix="runs/r2/", recursive=True)}
    assert "runs/r2/a.txt" not in keys and "runs/r2/new.txt" in keys
    assert files_of(st.download_dir("s3://kat-test/runs/r2", tmp_path / "dl")) == files_of(src)


def test_tampered_object_is_detected_and_nothing_is_left(s3, tmp_path):
    import io

    src = tmp_path / "src"
    make_tree(src)
    st = store(s3)
    st.upload_dir(src, "s3://kat-test/runs/r3")
    evil = b"tampered"
    st._client().put_object("kat-test", "runs/r3/sub/b.bin", io.BytesIO(evil), len(evil))
    with pytest.raises(KatError, match=r"sha256 mismatch for s3://kat-test/runs/r3/sub/b.bin"):
        st.download_dir("s3://kat-test/runs/r3", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dl")]  # no temp dir left behind


def test_unfinished_upload_is_not_a_directory(s3, tmp_path):
    import io

    st = store(s3)
    st._client().put_object("kat-test", "runs/half/a.txt", io.BytesIO(b"x"), 1)  # files but no index
    with pytest.raises(KatError, match="no complete directory"):
        st.download_dir("s3://kat-test/runs/half", tmp_path / "dl")


def test_wrong_credentials_one_readable_error(s3, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    bad = store(s3, access_key="AKIAWRONGWRONG", secret_key="nope")
    with pytest.raises(KatError) as err:
        bad.upload_dir(src, "s3://kat-test/runs/r4")
    msg = str(err.value)
    assert "\n" not in msg and "rejected the credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    wrong_secret = store(s3, secret_key="not-the-secret")
    with pytest.raises(KatError, match="rejected the credentials"):
        wrong_secret.download_dir("s3://kat-test/runs/r1/ckpt", tmp_path / "dl")


def test_endpoint_down_one_readable_error_after_retries(tmp_path, caplog):
    src = tmp_path / "src"
    make_tree(src)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    st = ObjectStore(f"http://127.0.0.1:{port}", "a", "b", region="us-east-1", attempts=3, backoff_s=0.01)
    with caplog.at_level("WARNING", logger="kat_core.platform.storage"), pytest.raises(KatError) as err:
        st.upload_dir(src, "s3://kat-test/x")
    msg = str(err.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "Connection refused" in msg and "3 attempts" in msg
    assert sum("retry" in r.message for r in caplog.records) == 2


def test_transient_failures_are_retried(s3, tmp_path, monkeypatch):
    import urllib3

    src = tmp_path / "src"
    make_tree(src)
    st = store(s3, attempts=3)
    client = st._client()
    real, calls = client.fput_object, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise urllib3.exceptions.ProtocolError("Connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "fput_object", flaky)
    st.upload_dir(src, "s3://kat-test/runs/flaky")
    assert calls["n"] == 4  # 3 files, the first twice
    assert files_of(st.download_dir("s3://kat-test/runs/flaky", tmp_path / "dl")) == files_of(src)


def test_env_configuration(s3, monkeypatch):
    monkeypatch.delenv("KAT_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret_key"])
    st = ObjectStore()
    assert st.endpoint == s3["endpoint"] and not st._client()._base_url.is_https
    assert st.exists("s3://kat-test/runs/r1/ckpt")
    monkeypatch.setenv("KAT_S3_ENDPOINT", "https://minio.example:9000")  # ours wins over MLflow's
    assert ObjectStore().endpoint == "https://minio.example:9000"


def test_local_paths_roundtrip_and_tamper(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    st = ObjectStore()
    st.upload_dir(src, tmp_path / "store" / "ckpt")
    assert (tmp_path / "store" / "ckpt" / INDEX).is_file()
    out = st.download_dir(tmp_path / "store" / "ckpt", tmp_path / "dl")
    assert files_of(out) == files_of(src)
    (tmp_path / "store" / "ckpt" / "a.txt").write_text("changed\n")
    with pytest.raises(KatError, match="sha256 mismatch"):
        st.download_dir(tmp_path / "store" / "ckpt", tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists()


def test_bad_uris(tmp_path):
    st = ObjectStore()
    with pytest.raises(KatError, match="not a directory"):
        st.upload_dir(tmp_path / "missing", "s3://kat-test/x")
    with pytest.raises(KatError, match="expected s3://bucket/prefix"):
        st.download_dir("s3:///nobucket", tmp_path / "dl")
    with pytest.raises(KatError, match="no complete directory"):
        st.download_dir(tmp_path, tmp_path / "dl")
    make_tree(tmp_path / "src")
    with pytest.raises(KatError, match="not its root"):  # would delete the rest of the bucket as stale
        st.upload_dir(tmp_path / "src", "s3://kat-test")


def test_tampered_index_cannot_write_outside_the_destination(s3, tmp_path):
    """An index is data from the bucket: one naming an absolute path (or `..`) must not make a download write
    (or a local copy read) outside the directory it fills. Before: the absolute path was written verbatim,
    then a FileNotFoundError traceback."""
    import hashlib

    import boto3

    payload = b"written by whoever could edit the bucket\n"
    digest = hashlib.sha256(payload).hexdigest()
    victim = tmp_path / "victim.txt"
    st = store(s3)
    # boto3 stores any key, as other S3 clients do (minio's client refuses `..` segments itself)
    b3 = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                      aws_access_key_id=s3["access_key"], aws_secret_access_key=s3["secret_key"])
    make_tree(tmp_path / "src")
    st.upload_dir(tmp_path / "src", "s3://kat-test/runs/evil")
    for rel in (str(victim), "../victim.txt", "sub/../../victim.txt"):
        b3.put_object(Bucket="kat-test", Key=f"runs/evil/{rel}", Body=payload)
        b3.put_object(Bucket="kat-test", Key=f"runs/evil/{INDEX}", Body=json.dumps({"files": {rel: digest}}))
        with pytest.raises(KatError, match="unsafe path"):
            st.download_dir("s3://kat-test/runs/evil", tmp_path / "dl" / "x")
        assert not victim.exists() and not (tmp_path / "dl" / "victim.txt").exists()

    # the same index in a local store: it would copy a file from outside the stored directory
    local = tmp_path / "store" / "ckpt"
    st.upload_dir(tmp_path / "src", local)
    (tmp_path / "store" / "secret.txt").write_bytes(payload)
    (local / INDEX).write_text(json.dumps({"files": {"../secret.txt": digest}}))
    with pytest.raises(KatError, match="unsafe path"):
        st.download_dir(local, tmp_path / "dl2" / "x")
    assert not (tmp_path / "dl2" / "secret.txt").exists()
