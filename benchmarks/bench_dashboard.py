"""Dashboard page latency with full stores, against MLflow's own query for the same data.

The stores: one real smoke pipeline run (`kat run`, its outputs, MLflow parent and stage runs, model
version 1), then 199 more runs recorded the way a cached rerun records itself (run.json with the same
outputs; an MLflow parent run with the config as params and seven stage runs with their metrics), and 49 more
versions of the model (with alias moves), so there are 200 runs and 50 versions. `kat serve` serves them from
its own process; pages are fetched over HTTP as a signed-in browser fetches them.

Each page against the MLflow call that fetches the data it shows, in this process on the same SQLite store:

    runs page (all 200 runs)  vs  search_runs: the 200 pipeline parent runs
    run detail page           vs  get_run(parent) + search_runs: its stage runs
    models page               vs  search_model_versions (50) + get_registered_model (aliases, history)

After a warm-up, repeats interleave ours and MLflow's for each page; the table shows medians (and p90), and
the first load of the run detail page, which has nothing cached. Targets: every page <= 300 ms and <= 3x
the bare MLflow query. The last line is `ratio ours/mlflow <worst page> latency: X`.

    .venv/bin/python benchmarks/bench_dashboard.py [--repeats 15] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789"
FAST = ["train.steps=6", "coldstart.prompts=6", "coldstart.k=1", "coldstart.max_new_tokens=16",
        "coldstart.train.steps=2", "srpo.train.steps=1", "srpo.prompts_per_step=2", "srpo.group_size=2",
        "srpo.max_new_tokens=16", "evaluate.limit=5", "evaluate.max_new_tokens=16", "evaluate.n_samples=0",
        # a few steps learn nothing: the promotion gate's floors would (rightly) keep every such model from
        # champion; these runs exercise the promotion plumbing, so the floors are off
        "registry.min_accuracy=0", "registry.min_well_formed=0"]
RUNS, VERSIONS = 200, 50


def populate(home: Path) -> str:
    """The stores; returns the id of the real run."""
    env = {**os.environ, "KAT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    args = [sys.executable, "-m", "kat_app.cli", "run", "--profile", "smoke", "--out", str(home / "out")]
    for override in FAST:
        args += ["--set", override]
    r = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"the smoke run failed:\n{r.stderr[-3000:]}")
    real = json.loads(r.stdout.strip().splitlines()[-1])["run_id"]
    print(f"real smoke run {real}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    os.environ["KAT_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from mlflow.entities import Metric, Param, RunTag

    from kat_core.config import load_config
    from kat_core.manifest import config_hash
    from kat_core.platform import registry
    from kat_core.platform.tracking import TAG_KFP_RUN, TAG_KIND, TAG_STAGE, experiment_id, flatten, get_client

    t0 = time.perf_counter()
    record = json.loads((home / "runs" / real / "run.json").read_text())
    log = (home / "runs" / real / "pipeline.log").read_text()
    config = load_config("smoke", FAST)
    params = [Param(k, v[:500]) for k, v in flatten(config.model_dump(mode="json")).items()]
    client = get_client()
    exp = experiment_id(client)
    base = time.time() - 86400 * 30
    for i in range(RUNS - 1):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(base + i * 600))
        run_id = f"local-{stamp}-{i:06x}"
        run_dir = home / "runs" / run_id
        run_dir.mkdir(parents=True)
        copy = {**record, "run_id": run_id, "log": str(run_dir / "pipeline.log"),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base + i * 600)),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base + i * 600 + 70)),
                "stages": [{**s, "status": "cached"} for s in record["stages"]]}
        (run_dir / "run.json").write_text(json.dumps(copy, indent=2))
        (run_dir / "pipeline.log").write_text(log)
        parent = client.create_run(exp, run_name="autothink-smoke", tags={
            TAG_KIND: "pipeline", TAG_KFP_RUN: run_id, "kat.profile": "smoke",
            "kat.config_hash": config_hash(config), "kat.code_version": "bench"}).info.run_id
        for start in range(0, len(params), 100):
            client.log_batch(parent, params=params[start:start + 100])
        for step, stage in enumerate(s["name"] for s in record["stages"]):
            child = client.create_run(exp, run_name=stage, tags={TAG_KIND: "stage", TAG_STAGE: stage,
                                                                 TAG_KFP_RUN: run_id, "mlflow.parentRunId": parent})
            client.log_batch(child.info.run_id, metrics=[Metric("loss", 5.0 - k / 10, 0, k) for k in range(6)],
                             params=[Param("profile", "smoke"), Param("seed", "0")],
                             tags=[RunTag("kat.out_dir", f"/bench/{stage}-{step}")])
            client.set_terminated(child.info.run_id, "FINISHED")
        client.set_terminated(parent, "FINISHED")
    print(f"{RUNS - 1} more runs recorded: {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    t0 = time.perf_counter()
    v1 = client.get_model_version("kat", "1")
    for v in range(2, VERSIONS + 1):
        client.create_model_version("kat", v1.source, run_id=v1.run_id, tags=dict(v1.tags))
        if v % 10 == 0:
            registry.promote("kat", v, reason=f"bench: promote v{v}", who="bench")
    print(f"{VERSIONS - 1} more model versions: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "KAT_HOME": str(home), "KAT_API_TOKEN": TOKEN}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "kat_app.cli", "serve", "--port", str(port)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                if json.loads(r.read())["worker"]:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("kat serve did not start")
        time.sleep(0.3)


def sign_in(url: str) -> str:
    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    data = urllib.parse.urlencode({"token": TOKEN, "next": "/runs"}).encode()
    try:
        urllib.request.build_opener(Keep()).open(urllib.request.Request(f"{url}/login", data=data, method="POST"))
    except urllib.error.HTTPError as e:
        return next(c for c in e.headers.get_all("set-cookie") if c.startswith("kat_session=")).split(";")[0]
    sys.exit("signing in failed")


def fetch(url: str, cookie: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Cookie": cookie}), timeout=60) as r:
        body = r.read()
        assert r.status == 200 and b"<html" in body
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--keep", type=Path, help="keep the stores in this directory (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: measure the stores kept there before")
    args = parser.parse_args()
    home = (args.keep or Path(tempfile.mkdtemp(prefix="kat-bench-dashboard-"))).resolve()
    if args.reuse and args.keep and (home / "mlflow.db").is_file():
        os.environ["KAT_HOME"] = str(home)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        real = next(p.parent.name for p in (home / "runs").glob("*/run.json")
                    if json.loads(p.read_text())["stages"][0]["status"] == "succeeded")
    else:
        if args.keep and home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        real = populate(home)

    from kat_core.platform.tracking import EXPERIMENT, TAG_KIND, find_pipeline_run, get_client

    client = get_client()
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent = find_pipeline_run(real)
    n_runs = len(client.search_runs([exp], f"tags.`{TAG_KIND}` = 'pipeline'", max_results=1000))
    n_versions = len(client.search_model_versions("name = 'kat'", max_results=1000))

    def mlflow_runs() -> None:
        found = client.search_runs([exp], f"tags.`{TAG_KIND}` = 'pipeline'", max_results=RUNS,
                                   order_by=["attributes.start_time DESC"])
        assert len(found) == RUNS

    def mlflow_detail() -> None:
        client.get_run(parent)
        assert len(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")) == 7

    def mlflow_models() -> None:
        assert len(client.search_model_versions("name = 'kat'", max_results=1000)) == VERSIONS
        client.get_registered_model("kat")

    proc, url = start_server(home)
    try:
        cookie = sign_in(url)
        first_detail = fetch(f"{url}/runs/{real}", cookie)  # nothing of this run cached yet
        pages = {
            "runs page": (f"{url}/runs?limit={RUNS}", mlflow_runs),
            "run detail page": (f"{url}/runs/{real}", mlflow_detail),
            "models page": (f"{url}/models", mlflow_models),
        }
        for page_url, peer in pages.values():  # warm-up
            fetch(page_url, cookie)
            peer()
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pages}
        for _ in range(args.repeats):
            for name, (page_url, peer) in pages.items():
                times[name][0].append(fetch(page_url, cookie))
                t0 = time.perf_counter()
                peer()
                times[name][1].append(time.perf_counter() - t0)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)

    def p90(xs: list[float]) -> float:
        return sorted(xs)[max(0, int(round(0.9 * len(xs))) - 1)]

    print(f"stores: {n_runs} pipeline runs (each with 7 stage runs), {n_versions} versions of 'kat'; "
          f"{args.repeats} interleaved repeats after a warm-up; ms")
    print(f"{'page':18s} {'ours median':>12s} {'ours p90':>9s} {'mlflow median':>14s} {'mlflow p90':>11s} "
          f"{'ratio':>6s}  target (<=300 ms, <=3x)")
    ratios = {}
    for name, (ours, peer) in times.items():
        mo, mp = statistics.median(ours), statistics.median(peer)
        ratios[name] = mo / mp
        ok = "ok" if mo <= 0.300 and ratios[name] <= 3 else "MISSED"
        print(f"{name:18s} {mo * 1e3:12.1f} {p90(ours) * 1e3:9.1f} {mp * 1e3:14.1f} {p90(peer) * 1e3:11.1f} "
              f"{ratios[name]:6.2f}  {ok}")
    print(f"first load of the run detail page (nothing cached): {first_detail * 1e3:.1f} ms")
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    worst = max(ratios, key=ratios.get)
    print(f"ratio ours/mlflow {worst.replace(' ', '_')}_latency: {ratios[worst]:.2f}")


if __name__ == "__main__":
    main()
