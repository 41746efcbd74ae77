"""Hostile and careless input to the dashboard's HTTP service: the real app (`create_app`, no run worker, no
live scheduler) through FastAPI's TestClient on a temporary KAT_HOME. Each answer is one readable 4xx, never
a 500, and nothing is stored that cannot work."""

import threading

import pytest
from fastapi.testclient import TestClient

TOKEN = "test-token-inputs-5d1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _join_warm_up() -> None:
    """Wait for the app's warm-up thread (its first MLflow query): MLflow copies the URI it is given into the
    environment, where it would outlive the test."""
    for thread in threading.enumerate():
        if thread.name == "kat-warm-up":
            thread.join(60)


@pytest.fixture
def client(tmp_path, monkeypatch):
    from kat_app.dashboard.app import create_app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # undone after the test
    app = create_app(tmp_path, token=TOKEN, worker=False, scheduler=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.home = tmp_path
        yield c
    _join_warm_up()


@pytest.mark.parametrize("value,message", [
    ("[" * 5000, "nested too deeply"),  # PyYAML's parser recurses once per bracket
    ("9" * 5000, "cannot be read"),  # Python refuses to turn 5000 digits into an int
    ("1:" * 3000 + "1", "cannot be read"),  # a YAML 1.1 base-60 int that large, made without a string
    ("2020-13-45", "cannot be read"),  # a YAML date that is no date
], ids=["nested", "digits", "base-60", "date"])
def test_override_values_yaml_cannot_build_are_refused(client, value, message):
    override = f"train.steps={value}"
    for path, body in (("/api/config/check", {"profile": "smoke", "overrides": [override]}),
                       ("/api/runs", {"profile": "smoke", "overrides": [override]}),
                       ("/api/schedules", {"cron": "0 3 * * *", "profile": "smoke", "overrides": [override]})):
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 422, (path, r.status_code, r.text[:300])
        assert message in r.json()["detail"], r.json()
    assert client.get("/api/runs", headers=AUTH).json()["runs"] == []  # nothing was recorded
    assert client.get("/api/schedules", headers=AUTH).json()["schedules"] == []


@pytest.mark.parametrize("cron,message", [
    ("*/61 * * * *", "bad cron"), ("0 */24 * * *", "bad cron"), ("0 0 1-5/9 * *", "bad cron"),
    ("0 0 30 2 *", "never fires"), ("0 0 31 4,6,9,11 *", "never fires"),
])
def test_a_cron_that_cannot_fire_is_refused(client, cron, message):
    r = client.post("/api/schedules", json={"cron": cron, "profile": "smoke"}, headers=AUTH)
    assert r.status_code == 422, (cron, r.status_code, r.text[:300])
    assert message in r.json()["detail"]
    assert client.get("/api/schedules", headers=AUTH).json()["schedules"] == []


def test_resuming_a_stored_schedule_that_never_fires_keeps_it(client):
    """A store written before create refused such crons: APScheduler lists the schedule as paused, and
    resuming it used to answer 500 and delete it."""
    from kat_app import schedules

    s = schedules.Schedule(schedule_id="sched-feb30000", cron="0 0 30 2 *", profile="smoke",
                           created_at="2026-01-01T00:00:00Z")
    with schedules._scheduler(client.home) as scheduler:
        schedules._add(scheduler, s, client.home)
    r = client.post("/api/schedules/sched-feb30000/resume", headers=AUTH)
    assert r.status_code == 422 and "never fires" in r.json()["detail"], (r.status_code, r.text[:300])
    assert [x["schedule_id"] for x in client.get("/api/schedules", headers=AUTH).json()["schedules"]] == \
        ["sched-feb30000"]


def test_a_weekday_range_from_7_is_sunday(client):
    from kat_app.schedules import weekday_names

    assert weekday_names("7-7") == "sun"  # cron: Sunday; was every day
    r = client.post("/api/schedules", json={"cron": "0 0 * * 7-7", "profile": "smoke"}, headers=AUTH)
    assert r.status_code == 201
    from datetime import datetime

    assert datetime.fromisoformat(r.json()["next_fire"]).isoweekday() == 7


def test_the_tracking_uris_password_stays_out_of_lineage_and_links(tmp_path, monkeypatch):
    """A tracking URI may carry credentials (http://user:password@host, postgresql://user:password@db/mlflow):
    they are the service's, not for whoever reads a run's lineage."""
    from kat_app.dashboard.app import create_app
    from kat_app.security import SESSION_COOKIE, session_value
    from kat_app.service import Service

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # nothing listens there: fail at once
    # as a deployment sets it (and so that MLflow's own copy of it in the environment goes when the test ends)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://kat:s3cret-pw@127.0.0.1:1")
    svc = Service(tmp_path)
    with TestClient(create_app(token=TOKEN, worker=False, scheduler=False, service=svc),
                    raise_server_exceptions=False) as client:
        run_id = client.post("/api/runs", json={"profile": "smoke"}, headers=AUTH).json()["run_id"]
        lineage = client.get(f"/api/runs/{run_id}/lineage", headers=AUTH)
        assert lineage.status_code == 200 and "cannot reach the MLflow tracking server" in lineage.text
        client.cookies.set(SESSION_COOKIE, session_value(TOKEN))  # a signed-in browser
        page = client.get(f"/runs/{run_id}")
        assert page.status_code == 200 and "cannot reach the MLflow tracking server" in page.text
        for answer in (lineage, page):
            assert "s3cret-pw" not in answer.text
    _join_warm_up()
    assert svc.mlflow_ui() == "http://127.0.0.1:1"  # links to MLflow's UI: the browser asks for a login
    db = Service(tmp_path, tracking_uri="postgresql://kat:s3cret-pw@db:5432/mlflow")
    assert db.mlflow_ui() is None and "s3cret-pw" not in db.mlflow_hint() and "postgresql://kat:" in db.mlflow_hint()


def _run_with_files(client, files: dict[str, str]) -> str:
    """A local run (submitted through the API) whose evaluate stage left `files` in its report output."""
    import json

    run_id = client.post("/api/runs", json={"profile": "smoke"}, headers=AUTH).json()["run_id"]
    report = client.home / "outputs" / run_id / "report"
    report.mkdir(parents=True)
    for name, text in files.items():
        (report / name).write_text(text)
    record = client.home / "runs" / run_id / "run.json"
    run = json.loads(record.read_text())
    run.update(status="succeeded", stages=[{"name": "evaluate", "status": "succeeded", "seconds": 1.0,
                                            "outputs": {"report": str(report)}}])
    record.write_text(json.dumps(run))
    return run_id


def test_every_run_file_a_browser_could_run_is_sandboxed(client):
    """Only *.html, *.htm, *.svg and *.xml were sandboxed: other names browsers run as documents were served
    under the dashboard's own policy, whose script-src 'self' lets them load a script from the run's files
    and act as the signed-in user."""
    page = "<html xmlns='http://www.w3.org/1999/xhtml'><script src='evil.js'></script></html>"
    names = ["page.shtml", "page.xhtml", "page.xht", "page.svgz", "page.xsl"]
    run_id = _run_with_files(client, {**dict.fromkeys(names, page), "evil.js": "fetch('/runs')"})
    for name in names:
        r = client.get(f"/api/runs/{run_id}/files/evaluate/report/{name}", headers=AUTH)
        assert r.status_code == 200 and r.text == page
        assert r.headers["content-security-policy"].startswith("sandbox"), (name, r.headers["content-type"])


def test_a_huge_body_is_refused_before_it_is_read(client):
    """FastAPI reads and parses a route's body before its token check runs: anyone could make the service hold
    as much memory as they send. Bodies have a ceiling (413), with or without a Content-Length."""
    from kat_app.dashboard.app import MAX_BODY

    big = b'{"profile": "' + b"x" * (MAX_BODY + 1) + b'"}'
    r = client.post("/api/runs", content=big, headers={"Content-Type": "application/json"})  # no token
    assert r.status_code == 413, (r.status_code, r.text[:200])
    r = client.post("/api/config/check", content=iter([big[:1000], big[1000:]]),  # chunked: no length
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413, (r.status_code, r.text[:200])
    r = client.post("/login", content=b"token=" + b"x" * (MAX_BODY + 1),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413, (r.status_code, r.text[:200])
    # what the forms and the API send is far below it
    r = client.post("/api/config/check", json={"profile": "smoke", "overrides": ["train.steps=3"] * 200}, headers=AUTH)
    assert r.status_code == 200


def test_a_schedule_name_its_runs_cannot_take_is_refused(client):
    """A schedule's runs are named after it, and a run name must be printable: a schedule named with a tab
    was stored, and every one of its firings failed."""
    r = client.post("/api/schedules", json={"cron": "0 3 * * *", "profile": "smoke", "name": "nightly\tretrain"},
                    headers=AUTH)
    if r.status_code == 201:  # show what became of it: fire it as the scheduler does
        from kat_app import schedules
        from kat_app.firing import fire

        with schedules._scheduler(client.home) as scheduler:
            kwargs = dict(scheduler.get_job(r.json()["schedule_id"]).kwargs)
        fire(**kwargs, trigger="manual")
        events = client.get(f"/api/schedules/{kwargs['schedule_id']}", headers=AUTH).json()["events"]
        pytest.fail(f"stored, and its firing: {events[0]['outcome']}")
    assert r.status_code == 422 and "printable" in r.json()["detail"]
    assert client.get("/api/schedules", headers=AUTH).json()["schedules"] == []


def test_a_file_name_too_long_for_the_file_system_is_not_found(client):
    """Path.is_file() lets ENAMETOOLONG through: a 300-character name in the URL answered 500."""
    from kat_app.security import SESSION_COOKIE, session_value

    run_id = _run_with_files(client, {"report.json": "{}"})
    client.cookies.set(SESSION_COOKIE, session_value(TOKEN))
    for name in ("a" * 300, "a/" * 50 + "b" * 300):
        r = client.get(f"/api/runs/{run_id}/files/evaluate/report/{name}", headers=AUTH)
        assert r.status_code == 404 and r.json()["detail"].startswith("no file"), (r.status_code, r.text[:200])
        r = client.get(f"/runs/{run_id}/files/evaluate/report/{name}")
        assert r.status_code == 404, (r.status_code, r.text[:200])
    assert client.get(f"/api/runs/{run_id}/files/evaluate/report/report.json", headers=AUTH).json() == {}


def test_the_api_schema_is_read_like_the_rest_of_the_api(client):
    """'Everything needs the API token' (README): the OpenAPI schema, every route and body of the API, was
    served to anyone."""
    r = client.get("/api/openapi.json")
    assert r.status_code == 401, r.status_code
    r = client.get("/api/openapi.json", headers=AUTH)
    assert r.status_code == 200 and "/api/runs" in r.json()["paths"]


def test_a_stages_error_is_redacted_like_the_runs(client, monkeypatch):
    """The run's error was masked, the same line in its failed stage was not: a secret the failure printed
    (a traceback naming an API key, a database URL with its password) showed in the API and on the page."""
    import json

    from kat_app.security import SESSION_COOKIE, session_value

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    reason = "openai.AuthenticationError: Incorrect API key provided: sk-test-0123456789abcdef"
    run_id = _run_with_files(client, {})
    record = client.home / "runs" / run_id / "run.json"
    run = json.loads(record.read_text())
    run.update(status="failed", error=f"synthesize: {reason}",
               stages=[{"name": "synthesize", "status": "failed", "seconds": 1.0, "outputs": {}, "error": reason}])
    record.write_text(json.dumps(run))
    answers = [client.get(path, headers=AUTH) for path in (f"/api/runs/{run_id}", f"/api/runs/{run_id}/stages",
                                                            "/api/runs")]
    client.cookies.set(SESSION_COOKIE, session_value(TOKEN))
    answers.append(client.get(f"/runs/{run_id}"))
    for answer in answers:
        assert answer.status_code == 200 and "Incorrect API key provided" in answer.text, answer.url
        assert "0123456789abcdef" not in answer.text, answer.url


def test_a_model_name_the_routes_refuse_neither_breaks_the_models_page_nor_is_taken(client):
    """Model routes take letters, digits, '.', '_' and '-' only; MLflow takes any name. A run submitted with
    `registry.model_name=KAT v2` was accepted, and once registered that name (sorting first) made the Models
    page a 422 for every model."""
    from kat_app.security import SESSION_COOKIE, session_value
    from kat_core.platform.tracking import get_client

    r = client.post("/api/runs", json={"profile": "smoke", "overrides": ["registry.model_name=KAT v2"]},
                    headers=AUTH)
    assert r.status_code == 422 and "registry.model_name" in r.json()["detail"], (r.status_code, r.text[:300])
    mlflow = get_client(client.app.state.service.tracking_uri)
    for name in ("KAT v2", "kat"):  # as a register stage run elsewhere (or before this check) left them
        mlflow.create_registered_model(name)
    client.cookies.set(SESSION_COOKIE, session_value(TOKEN))
    page = client.get("/models")
    assert page.status_code == 200 and "<b>kat</b>" in page.text, (page.status_code, page.text[-800:])


def test_a_hand_edited_registry_tag_does_not_break_the_model_pages(client, tmp_path):
    """A version's evaluation summary or an alias event edited into something that is not JSON (the MLflow UI
    allows it) made the model's versions and history a 500, and the Models page with them."""
    from kat_app.security import SESSION_COOKIE, session_value
    from kat_core.platform.registry import EVENT_PREFIX, TAG_SUMMARY
    from kat_core.platform.tracking import get_client

    mlflow = get_client(client.app.state.service.tracking_uri)
    mlflow.create_registered_model("kat")
    source = tmp_path / "weights"
    source.mkdir()
    mv = mlflow.create_model_version("kat", source=str(source))
    mlflow.set_model_version_tag("kat", mv.version, TAG_SUMMARY, "{edited by hand")
    mlflow.set_registered_model_tag("kat", f"{EVENT_PREFIX}000001", "not an event")
    versions = client.get("/api/models/kat/versions", headers=AUTH)
    assert versions.status_code == 200, versions.text[:300]
    [v] = versions.json()["versions"]
    assert v["evaluation"] == {"unreadable": "{edited by hand"}
    history = client.get("/api/models/kat/history", headers=AUTH)
    assert history.status_code == 200 and history.json()["events"] == [{"unreadable": "not an event"}], history.text
    client.cookies.set(SESSION_COOKIE, session_value(TOKEN))
    assert client.get("/models").status_code == 200
    compare = client.get("/models/kat/compare?a=1&b=1")  # reads the version itself: one line, not a 500
    assert compare.status_code < 500 and "unreadable evaluation summary" in compare.text, compare.status_code
