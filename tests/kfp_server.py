"""A Kubeflow Pipelines API server on loopback, for tests: the v2beta1 REST calls kfp.Client (kfp 2.17) makes
for submit, runs and recurring runs, with the JSON shapes of the kfp-server-api models.

    GET  /apis/v2beta1/healthz                          V2beta1GetHealthzResponse
    GET  /apis/v2beta1/experiments?filter=&namespace=   V2beta1ListExperimentsResponse (display_name EQUALS)
    POST /apis/v2beta1/experiments                      V2beta1Experiment
    GET  /apis/v2beta1/experiments/{id}                 V2beta1Experiment
    POST /apis/v2beta1/runs                             V2beta1Run (pipeline_spec inline, runtime_config)
    GET  /apis/v2beta1/runs?page_size=&sort_by=         V2beta1ListRunsResponse
    GET  /apis/v2beta1/runs/{id}                        V2beta1Run
    POST /apis/v2beta1/runs/{id}:terminate              {}
    POST /apis/v2beta1/recurringruns                    V2beta1RecurringRun (cron_schedule trigger)
    GET  /apis/v2beta1/recurringruns                    V2beta1ListRecurringRunsResponse ("recurringRuns")
    GET  /apis/v2beta1/recurringruns/{id}               V2beta1RecurringRun
    DELETE /apis/v2beta1/recurringruns/{id}             {}

Errors are google.rpc.Status bodies (`code`, `message`) with the HTTP status the real server uses. Like the
real server, it checks that a run's parameters are inputs of its pipeline and that a cron has the 6
fields (seconds first) of robfig/cron. `token`/`cookie` make it demand that credential on every call.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, http: int, grpc: int, message: str):
        super().__init__(message)
        self.http, self.grpc, self.message = http, grpc, message


def _not_found(kind: str, id_: str) -> ApiError:
    return ApiError(404, 5, f"{kind} {id_} not found")


class FakeKFP:
    def __init__(self, token: str | None = None, cookie: str | None = None):
        self.token, self.cookie = token, cookie
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKFP:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what a test sets: a run's progress, as the real server reports it from Argo/MLMD

    def finish_run(self, run_id: str, state: str = "SUCCEEDED", tasks: dict[str, str] | None = None) -> None:
        with self.lock:
            run = self.runs[run_id]
            run["state"], run["finished_at"] = state, _now()
            run["run_details"] = {"task_details": [
                {"run_id": run_id, "task_id": uuid.uuid4().hex, "display_name": name, "state": task_state,
                 "start_time": "2026-01-01T03:00:00Z", "end_time": "2026-01-01T03:00:42Z"}
                for name, task_state in (tasks or {}).items()]}

    # -- the API

    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        m = re.fullmatch(rf"{API}/(\w+)(?:/([\w-]+))?(?::(\w+))?", path)
        if not m:
            raise ApiError(404, 5, f"no route for {method} {path}")
        collection, id_, verb = m.groups()
        handler = getattr(self, f"{method.lower()}_{collection}", None)
        if handler is None:
            raise ApiError(405, 12, f"{method} {path} is not implemented")
        return handler(id_, verb, query, body)

    def get_healthz(self, *_: Any) -> dict[str, Any]:
        return {"multi_user": False, "pipeline_store": "database"}

    def get_experiments(self, id_: str | None, _verb: Any, query: dict[str, list[str]], _body: Any) -> dict:
        if id_:
            if id_ not in self.experiments:
                raise _not_found("experiment", id_)
            return self.experiments[id_]
        found = list(self.experiments.values())
        if query.get("filter"):
            for p in json.loads(query["filter"][0]).get("predicates", []):
                if p.get("key") != "display_name" or p.get("operation") not in (1, "EQUALS"):
                    raise ApiError(400, 3, f"unsupported filter predicate {p}")
                found = [e for e in found if e["display_name"] == p.get("stringValue", p.get("string_value"))]
        return {"experiments": found, "total_size": len(found)}

    def post_experiments(self, _id: Any, _verb: Any, _query: Any, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("display_name"):
            raise ApiError(400, 3, "experiment display_name is required")
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                      "description": body.get("description") or "", "namespace": body.get("namespace") or "",
                      "created_at": _now(), "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _check_pipeline(self, body: dict[str, Any]) -> None:
        spec = body.get("pipeline_spec")
        if not spec:
            raise ApiError(400, 3, "pipeline_spec (inline) or pipeline_version_reference is required")
        spec = spec.get("pipeline_spec", spec)  # {pipeline_spec, platform_spec} when there is a platform spec
        for key in ("pipelineInfo", "root", "components", "deploymentSpec", "schemaVersion"):
            if key not in spec:
                raise ApiError(400, 3, f"invalid pipeline spec: missing {key}")
        if body.get("experiment_id") not in self.experiments:
            raise ApiError(404, 5, f"experiment {body.get('experiment_id')} not found")
        declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
        for name in (body.get("runtime_config") or {}).get("parameters") or {}:
            if name not in declared:
                raise ApiError(400, 3, f"parameter {name!r} is not an input of the pipeline")

    def post_runs(self, _id: Any, _verb: Any, _query: Any, body: dict[str, Any]) -> dict[str, Any]:
        self._check_pipeline(body)
        run = {"run_id": str(uuid.uuid4()), "display_name": body.get("display_name"),
               "experiment_id": body["experiment_id"], "pipeline_spec": body["pipeline_spec"],
               "runtime_config": body.get("runtime_config") or {}, "service_account": body.get("service_account"),
               "storage_state": "AVAILABLE", "state": "PENDING", "created_at": _now(), "scheduled_at": _now(),
               "run_details": {"task_details": []}}
        self.runs[run["run_id"]] = run
        return run

    def get_runs(self, id_: str | None, _verb: Any, query: dict[str, list[str]], _body: Any) -> dict[str, Any]:
        if id_:
            if id_ not in self.runs:
                raise _not_found("run", id_)
            return self.runs[id_]
        runs = sorted(self.runs.values(), key=lambda r: r["created_at"],
                      reverse=query.get("sort_by", [""])[0].endswith("desc"))
        size = int(query.get("page_size", ["10"])[0])
        return {"runs": runs[:size], "total_size": len(runs), "next_page_token": ""}

    def post_runs_verb(self, id_: str, verb: str) -> dict[str, Any]:
        if id_ not in self.runs:
            raise _not_found("run", id_)
        if verb != "terminate":
            raise ApiError(405, 12, f"runs:{verb} is not implemented")
        self.runs[id_]["state"] = "CANCELING"
        return {}

    def post_recurringruns(self, _id: Any, _verb: Any, _query: Any, body: dict[str, Any]) -> dict[str, Any]:
        self._check_pipeline(body)
        cron = ((body.get("trigger") or {}).get("cron_schedule") or {}).get("cron", "")
        if len(cron.split()) != 6:
            raise ApiError(400, 3, f"invalid cron {cron!r}: robfig/cron needs 6 fields (seconds first)")
        job = {"recurring_run_id": str(uuid.uuid4()), "display_name": body.get("display_name"),
               "description": body.get("description"), "experiment_id": body["experiment_id"],
               "pipeline_spec": body["pipeline_spec"], "runtime_config": body.get("runtime_config") or {},
               "trigger": body["trigger"], "max_concurrency": str(body.get("max_concurrency", "1")),
               "no_catchup": body.get("no_catchup"), "mode": body.get("mode", "ENABLE"),
               "status": "ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED",
               "created_at": _now(), "updated_at": _now(), "namespace": ""}
        self.recurring[job["recurring_run_id"]] = job
        return job

    def get_recurringruns(self, id_: str | None, _verb: Any, query: dict[str, list[str]], _body: Any) -> dict:
        if id_:
            if id_ not in self.recurring:
                raise _not_found("recurring run", id_)
            return self.recurring[id_]
        jobs = list(self.recurring.values())[: int(query.get("page_size", ["10"])[0])]
        return {"recurringRuns": jobs, "total_size": len(self.recurring), "next_page_token": ""}

    def delete_recurringruns(self, id_: str | None, *_: Any) -> dict[str, Any]:
        if not id_ or id_ not in self.recurring:
            raise _not_found("recurring run", str(id_))
        del self.recurring[id_]
        return {}

    # -- HTTP

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            return False
        return not (self.cookie and self.cookie not in headers.get("cookie", ""))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                length = int(headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                with fake.lock:
                    fake.requests.append((method, url.path, headers))
                    try:
                        if not fake._authorized(headers):
                            raise ApiError(401, 16, "missing or invalid credentials")
                        body = json.loads(raw) if raw else {}
                        m = re.fullmatch(rf"{API}/runs/([\w-]+):(\w+)", url.path)
                        if method == "POST" and m:
                            status, payload = 200, fake.post_runs_verb(*m.groups())
                        else:
                            status, payload = 200, fake.route(method, url.path, parse_qs(url.query), body)
                    except ApiError as e:
                        status, payload = e.http, {"error": e.message, "code": e.grpc, "message": e.message,
                                                   "details": []}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (the http.server protocol)
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
