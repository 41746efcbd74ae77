"""One check of a whole config before anything is queued: the bad values a stage would refuse minutes into a run
(ranges, heads that do not divide the hidden size, unknown suites and families) are refused by `load_config`,
hence by `kat run`/`--set`, `POST /api/config/check`, schedules and the dashboard's form alike, each with one
readable line naming the key. The service and the browser are the real ones (`kat serve` in a subprocess,
Playwright driving Debian's chromium)."""

import os

import pytest

from kat_core.config import load_config
from kat_core.errors import KatError
from tests.helpers import kat, kat_here
from tests.test_dashboard import CHROMIUM, TOKEN, Server, api

# (override, the key the error names, a fragment of the reason)
BAD = [
    ("train.steps=-5", "train.steps", "greater than or equal to 1"),
    ("train.micro_batch_size=0", "train.micro_batch_size", "greater than or equal to 1"),
    ("train.lr=-0.001", "train.lr", "greater than 0"),
    ("model.hidden_size=7", "model.num_heads", "do not divide hidden_size 7"),
    ("model.hidden_size=6", "model.num_heads", "head size 3, which must be even"),
    ("evaluate.suites=[nonsense]", "evaluate.suites", "unknown task family 'nonsense'; known: aime24, arith"),
    ("evaluate.suites=[]", "evaluate.suites", "at least one evaluation suite"),
    ("evaluate.limit=-3", "evaluate.limit", "greater than or equal to 1"),
    ("srpo.train.steps=0", "srpo.train.steps", "greater than or equal to 1"),
    ("coldstart.train.lr=0", "coldstart.train.lr", "greater than 0"),
    ("pretrain.teacher_model={hidden_size: 100, num_heads: 3}", "pretrain.teacher_model.num_heads", "divide"),
    ("synth.families={gsm8k: 3}", "synth.families", "'gsm8k' has no train split"),
    ("synth.families={algebra: 3}", "synth.families", "unknown task family 'algebra'"),
    ("synth.levels=[0, 6]", "synth.levels", "arith levels"),
    ("validate.overlap_suites=[nope]", "validate.overlap_suites", "unknown task family 'nope'"),
    ("validate.mode_share_max=0.1", "validate.mode_share_max", "at least mode_share_min"),
]


@pytest.mark.parametrize("override,key,reason", BAD, ids=[b[0] for b in BAD])
def test_load_config_refuses_what_a_stage_would(override, key, reason):
    with pytest.raises(KatError) as e:
        load_config("smoke", [override])
    message = str(e.value)
    assert f"config key '{key}'" in message and reason in message and "\n" not in message, message


def test_the_shipped_profiles_pass_their_own_checks():
    for profile in ("smoke", "demo", "cluster"):
        load_config(profile)
    # the limits are not tighter than what works: an even head size, a positive step count
    assert load_config("smoke", ["model.hidden_size=8", "model.num_heads=4", "train.steps=1"]).train.steps == 1


def test_kat_run_refuses_a_bad_config_in_one_line_before_anything_starts(tmp_path):
    home = tmp_path / "home"
    r = kat("run", "--profile", "smoke", "--set", "train.steps=-5", env={"KAT_HOME": str(home)}, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["error: profile smoke with --set: config key 'train.steps' = -5: "
                     "Input should be greater than or equal to 1"], r.stderr
    for override, key, _ in BAD[:6]:
        r = kat_here("run", "--profile", "smoke", "--set", override, env={"KAT_HOME": str(home)})
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and key in r.stderr, (override, r.stderr)
    assert not list(home.glob("runs/*")), "a refused config left a run record"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("kat_home"))
    s.start()
    yield s
    s.stop()
    s.log.close()


def test_api_check_runs_and_schedules_refuse_each_bad_value(server):
    for override, key, reason in BAD:
        status, answer = api(server, "POST", "/api/config/check", {"profile": "smoke", "overrides": [override]})
        assert status == 422 and key in answer["detail"] and reason in answer["detail"], (override, answer)
    for override in ("train.steps=-5", "model.hidden_size=7", "evaluate.suites=[nonsense]"):
        status, answer = api(server, "POST", "/api/runs", {"profile": "smoke", "overrides": [override]})
        assert status == 422, answer
    status, answer = api(server, "POST", "/api/schedules",
                         {"cron": "0 3 * * *", "profile": "smoke", "overrides": ["train.steps=-3"]})
    assert status == 422 and "train.steps" in answer["detail"], answer
    assert api(server, "GET", "/api/schedules")[1]["schedules"] == []
    assert api(server, "GET", "/api/runs")[1]["runs"] == []
    status, answer = api(server, "POST", "/api/config/check", {"profile": "smoke", "overrides": ["train.steps=3"]})
    assert status == 200 and answer["ok"] and answer["purpose"].startswith("a plumbing check"), answer


def test_the_form_says_what_is_wrong_and_queues_nothing(server):
    from playwright.sync_api import expect, sync_playwright

    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"no chromium at {CHROMIUM}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        page = browser.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{server.url}/runs/new")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url("**/runs/new")
        for field, value, key in [("cfg.train.steps", "-5", "train.steps"),
                                  ("cfg.model.hidden_size", "7", "model.num_heads"),
                                  ("cfg.evaluate.suites", "[nonsense]", "evaluate.suites")]:
            page.goto(f"{server.url}/runs/new?profile=smoke")
            section = page.locator("details.section", has=page.locator(f"[name='{field}']"))
            if not section.evaluate("d => d.open"):
                section.locator("summary").click()  # the section folded away, as a user opens it
            page.fill(f"[name='{field}']", value)
            page.click("#check-button")
            expect(page.locator("#check-result")).to_contain_text(key)
            expect(page.locator("#check-result")).to_have_class("check error")
            page.click("#submit-run")  # submitting checks again and stays on the form
            expect(page.locator("#check-result")).to_contain_text(key)
        # a good config passes, and the smoke profile says what it is for
        page.goto(f"{server.url}/runs/new?profile=smoke")
        page.click("#check-button")
        expect(page.locator("#check-result")).to_have_class("check ok")
        expect(page.locator("#check-result")).to_contain_text("Profile smoke: a plumbing check")
        browser.close()
    assert api(server, "GET", "/api/runs")[1]["runs"] == []


# --------------------------------------------------------------------------- what each pipeline stage depends on

def test_every_config_key_belongs_to_a_stage_and_later_stages_read_more():
    from kat_core.config import PIPELINE_STAGES, STAGE_READS, KatConfig, stage_keys

    declared = [key for _, reads in STAGE_READS for key in reads]
    # a new top-level section must be placed in the DAG, or its overrides would be cached out
    assert sorted(declared) == sorted(f.alias or n for n, f in KatConfig.model_fields.items())
    assert len(set(declared)) == len(declared)
    for earlier, later in zip(PIPELINE_STAGES, PIPELINE_STAGES[1:], strict=False):
        assert stage_keys(earlier) < stage_keys(later)
    assert stage_keys("pretrain-teacher") == stage_keys("pretrain")
    with pytest.raises(KatError, match="unknown pipeline stage 'train'"):
        stage_keys("train")


def test_a_stage_gets_only_the_overrides_it_depends_on():
    from kat_core.config import stage_overrides

    given = ["seed=3", "train.steps=9", "validate.mode_share_min=0.1", "evaluate.limit=7", "registry.min_accuracy=0"]
    assert stage_overrides("synthesize", given) == ["seed=3"]
    assert stage_overrides("validate", given) == ["seed=3", "validate.mode_share_min=0.1"]
    assert stage_overrides("pretrain-teacher", given) == ["seed=3", "train.steps=9", "validate.mode_share_min=0.1"]
    assert stage_overrides("evaluate", given) == given[:4]
    assert stage_overrides("register", given) == given
    # the stage's config is the profile with those overrides: what it reads is what the whole config says
    whole = load_config("smoke", given)
    for stage in ("synthesize", "evaluate"):
        scoped = load_config("smoke", stage_overrides(stage, given))
        assert scoped.seed == whole.seed and scoped.synth == whole.synth
    assert load_config("smoke", stage_overrides("evaluate", given)).evaluate == whole.evaluate


def test_the_configure_component_returns_one_list_per_stage(tmp_path, monkeypatch):
    from components.configure import configure
    from kat_core.config import PIPELINE_STAGES

    assert list(configure.component_spec.outputs) == list(PIPELINE_STAGES)
    monkeypatch.setenv("KAT_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KAT_RUN_ID", "local-configure-test")
    scoped = configure.python_func(profile="smoke", overrides=["evaluate.limit=7", "synth.tag_threshold=0.4"])
    assert scoped.synthesize == ["synth.tag_threshold=0.4"]
    assert scoped.register == ["evaluate.limit=7", "synth.tag_threshold=0.4"]
    # it opened the run's MLflow parent with the whole config
    from kat_core.platform.tracking import find_pipeline_run, get_client, resolve_tracking_uri

    parent = find_pipeline_run("local-configure-test", tracking_uri=resolve_tracking_uri(None))
    assert get_client(resolve_tracking_uri(None)).get_run(parent).data.params["evaluate.limit"] == "7"
    with pytest.raises(SystemExit):  # a bad config ends the task with one `error:` line
        configure.python_func(profile="smoke", overrides=["train.steps=-5"])


@pytest.mark.parametrize("raw", ["[" * 5000, "9" * 5000, "2020-13-45"])
def test_an_override_value_yaml_cannot_build_is_one_readable_error(raw):
    # YAML's parser recurses on nested brackets, and what it builds can fail outside YAMLError (an int past
    # Python's digit limit, a date that does not exist): a traceback before
    from kat_core.config import parse_override

    with pytest.raises(KatError, match=r"--set train\.steps: the value (is nested too deeply|cannot be read)"):
        parse_override(f"train.steps={raw}")


def test_an_infinite_or_nan_setting_is_refused():
    for value in ("1e999", ".nan", "-.inf"):
        with pytest.raises(KatError, match="train.lr"):
            load_config("smoke", [f"train.lr={value}"])


def test_a_registered_model_name_the_cli_and_dashboard_cannot_name_is_refused_at_the_start():
    for name in ("my model", "o'brien", "-kat", "k" * 129):
        with pytest.raises(KatError, match="registry.model_name"):
            load_config("smoke", [f"registry.model_name={name}"])
    assert load_config("smoke", ["registry.model_name=kat-v2.1_x"]).registry.model_name == "kat-v2.1_x"
