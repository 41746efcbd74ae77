import json

import pytest

from kat_core.config import load_config
from kat_core.data.dataset import read_records
from kat_core.data.synth import synthesize
from kat_core.errors import KatError
from kat_core.format import parse
from kat_core.manifest import sha256_file, verify_manifest
from tests.chat_server import ChatServer, wrong_on


@pytest.fixture(scope="module")
def smoke_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    manifest = synthesize(load_config("smoke"), out, progress=False)
    return out, manifest


def test_every_record_parses_in_its_mode(smoke_dataset):
    out, manifest = smoke_dataset
    records = read_records(out)
    assert len(records) == manifest["records"] > 0
    for r in records:
        p = parse(r["completion"])
        assert p.well_formed and p.mode == r["mode"], r
        assert p.answer == r["answer"]  # the value alone


def test_regimes_follow_the_tagger_and_mirror_share(smoke_dataset):
    out, manifest = smoke_dataset
    records = read_records(out)
    tagged = [r for r in records if r["regime"] == "tagged"]
    assert {r["mode"] for r in tagged if r["difficulty"] == 1} == {"off"}
    assert {r["mode"] for r in tagged if r["difficulty"] == 5} == {"on"}
    mirrors = [r for r in records if r["regime"] == "mirror"]
    assert 0.35 < len(mirrors) / manifest["items"] < 0.65  # mirror_share 0.5
    by_source = {}
    for r in records:
        by_source.setdefault(r["source_id"], set()).add(r["mode"])
    assert all(len(modes) == 2 for sid, modes in by_source.items() if any(
        m["source_id"] == sid for m in mirrors))


def test_manifest_counts_digests_and_critic(smoke_dataset):
    out, m = smoke_dataset
    assert verify_manifest(out) == []
    assert m["files"]["train-00000.jsonl"] == sha256_file(out / "train-00000.jsonl")
    assert sum(m["counts"]["mode"].values()) == m["records"]
    assert set(m["counts"]["level_mode"]) == {"1", "2", "3", "4", "5"}
    critic = m["critic"]
    injected = sum(critic["injected_errors"].values())
    assert injected > 0 and critic["catch_rate"] == 1.0 and critic["false_rejects"] == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(m["rejects"].values()) == injected
    assert {r["reason"] for r in rejects} <= {"bad_step", "wrong_answer"}


def test_same_seed_same_data(tmp_path, smoke_dataset):
    out, m = smoke_dataset
    again = synthesize(load_config("smoke"), tmp_path / "again", progress=False)
    assert again["files"] == m["files"]
    other = synthesize(load_config("smoke", ["seed=1"]), tmp_path / "other", progress=False)
    assert other["files"] != m["files"]


def test_no_errors_injected_means_no_rejects(tmp_path):
    m = synthesize(load_config("smoke", ["synth.draft_error_rate=0", "synth.families={arith: 50}"]),
                   tmp_path / "d", progress=False)
    assert m["rejects"] == {} and m["critic"]["catch_rate"] is None


def test_openai_backend_against_a_loopback_chat_server(tmp_path):
    with ChatServer() as server:
        config = load_config("smoke", [
            "synth.agent_backend=openai", f"synth.openai.base_url={server.base_url}",
            "synth.openai.model=loopback-solver", "synth.openai.api_key=test", "synth.families={arith: 40}",
            "synth.mirror_share=0",
        ])
        m = synthesize(config, tmp_path / "d", progress=False)
    records = read_records(tmp_path / "d")
    on = [r for r in records if r["mode"] == "on"]
    assert on and all(not wrong_on(r["source_id"].split("-", 2)[2]) for r in on)
    assert m["rejects"].get("wrong_answer", 0) > 0  # the server's wrong answers were caught
    assert all(parse(r["completion"]).well_formed for r in records)


def test_openai_backend_unreachable_is_one_readable_error(tmp_path):
    config = load_config("smoke", [
        "synth.agent_backend=openai", "synth.openai.base_url=http://127.0.0.1:9/v1",
        "synth.openai.model=m", "synth.openai.timeout_s=2", "synth.families={arith: 30}",
    ])
    with pytest.raises(KatError, match="unreachable"):
        synthesize(config, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_openai_backend_needs_an_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(KatError, match="base_url"):
        synthesize(load_config("smoke", ["synth.agent_backend=openai"]), tmp_path / "d", progress=False)


def test_evaluation_only_family_is_refused(tmp_path):
    with pytest.raises(KatError, match="no train split"):
        synthesize(load_config("smoke", ["synth.families={gsm8k: 5}"]), tmp_path / "d", progress=False)
