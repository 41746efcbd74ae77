"""Models: registered versions, aliases and their history, comparisons, and promote / roll back through
the one promotion gate (`registry.Margins.from_config`: the config's registry section, as the pipeline's
register stage reads it)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kat_app.service.base import ServiceBase
from kat_core.config import RegistryConfig, load_config
from kat_core.errors import Invalid, KatError, NotFound
from kat_core.eval import plots
from kat_core.eval.report import comparison
from kat_core.platform import registry
from kat_core.platform.gate import EvalSummary, Margins, gate
from kat_core.platform.registry import CHAMPION, EVENT_PREFIX, TAG_SUMMARY
from kat_core.platform.tracking import get_client, mlflow_errors
from kat_core.util import atomic_write_json


def _tag_json(text: str) -> Any:
    """A kat tag's JSON, or {"unreadable": text} for one edited by hand (the MLflow UI allows it): one such
    version or event must not make the model's pages a 500."""
    try:
        return json.loads(text)
    except ValueError:
        return {"unreadable": text[:500]}

class ModelsService(ServiceBase):
    def models(self) -> list[dict[str, Any]]:
        return registry.list_models(tracking_uri=self.tracking_uri)

    def model_names(self) -> list[str]:
        with mlflow_errors(self.tracking_uri):
            return sorted(m.name for m in get_client(self.tracking_uri).search_registered_models(max_results=1000))

    def _registered(self, name: str):
        """The registered model (aliases, tags with the alias history), or NotFound."""
        from mlflow.exceptions import MlflowException

        name = self._model_name(name)
        with mlflow_errors(self.tracking_uri):
            client = get_client(self.tracking_uri)
            try:
                return client.get_registered_model(name)
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise NotFound(f"no registered model {name!r}") from None
                raise

    def model_overview(self, name: str) -> dict[str, Any]:
        """What the models page shows of `name`, in two registry queries: versions, aliases, history."""
        registered = self._registered(name)
        return {"name": name, "versions": self.versions(name, registered), "aliases": self._aliases(registered),
                "history": self._history(registered)}

    def versions(self, name: str, registered: Any = None) -> list[dict[str, Any]]:
        """Every version of `name`, newest first: aliases, when, evaluation summary, lineage pointers."""
        registered = registered or self._registered(name)
        ui = self.mlflow_ui()
        with mlflow_errors(self.tracking_uri):
            found = get_client(self.tracking_uri).search_model_versions(registry.versions_filter(name),
                                                                 max_results=10_000)
        # a search does not fill in the versions' aliases (MLflow 3.17): the registered model has them
        aliases: dict[int, list[str]] = {}
        for alias, v in registered.aliases.items():
            aliases.setdefault(int(v), []).append(alias)
        out = []
        for mv in found:
            tags = dict(mv.tags)
            summary = _tag_json(tags[TAG_SUMMARY]) if TAG_SUMMARY in tags else None
            out.append({
                "name": name, "version": int(mv.version), "aliases": sorted(aliases.get(int(mv.version), [])),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                "evaluation": summary, "profile": tags.get("kat.profile"),
                "run_id": tags.get("kat.kfp_run_id"), "pipeline_run_id": tags.get("kat.pipeline_run_id"),
                "code_version": tags.get("kat.code_version"), "data": tags.get("kat.data.synthesize"),
                "url": f"{ui}/#/models/{name}/versions/{mv.version}" if ui else None,
            })
        return sorted(out, key=lambda v: v["version"], reverse=True)

    def version(self, name: str, version: int | str, *, local_path: bool = False) -> dict[str, Any]:
        """A version's record; with `local_path`, also where its checkpoint lies on this machine ("local_path":
        None when its artifacts are on a remote store)."""
        info = registry.show_version(self._model_name(name), version, tracking_uri=self.tracking_uri)
        if local_path:
            from kat_core.platform.served import local_checkpoint

            path = local_checkpoint(info["name"], info["version"], tracking_uri=self.tracking_uri)
            info["local_path"] = str(path) if path else None
        return info

    @staticmethod
    def _aliases(registered: Any) -> dict[str, int]:
        return {alias: int(v) for alias, v in sorted(registered.aliases.items())}

    def aliases(self, name: str) -> dict[str, int]:
        return self._aliases(self._registered(name))

    @staticmethod
    def _history(registered: Any) -> list[dict[str, Any]]:

        tags = registered.tags
        return [_tag_json(tags[k]) for k in sorted(tags) if k.startswith(EVENT_PREFIX)]

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of `name`, oldest first (registry.history's events, as dicts)."""
        return self._history(self._registered(name))

    def _version_report(self, name: str, version: int) -> dict[str, Any] | None:
        """The evaluation report registered with a version (its register run's report.json), cached."""

        info = self.version(name, version)
        key = info["register_run_id"] or f"{name}-{version}"
        if key in self._report_cache:
            return self._report_cache[key]
        cache = self.home / "dashboard" / "reports" / f"{key}.json"
        report = None
        if cache.is_file():
            report = json.loads(cache.read_text())
        elif info["register_run_id"]:
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            with mlflow_errors(self.tracking_uri), tempfile.TemporaryDirectory() as tmp:
                client = get_client(self.tracking_uri)
                try:
                    path = client.download_artifacts(info["register_run_id"], "report.json", tmp)
                    report = json.loads(Path(path).read_text())
                except Exception:  # no report.json logged (or unreadable): compare by the summaries
                    report = None
            if report is not None:
                atomic_write_json(cache, report, indent=None)
        self._report_cache[key] = report
        return report

    def compare(self, name: str, a: int, b: int) -> dict[str, Any]:
        """Version `a` (the baseline) against `b`: accuracy, tokens and think-on rate per mode, suite and
        difficulty level, the gate's verdict on b against a, and the frontier plot (`compare_plot`)."""

        name = self._model_name(name)
        va, vb = self.version(name, a), self.version(name, b)
        ra, rb = self._version_report(name, int(a)), self._version_report(name, int(b))
        full = all(r and r.get("schema", "").startswith("kat-eval-report/") for r in (ra, rb))
        if full:
            result = comparison(ra, rb, {}, {}, (f"{name} v{a}", f"{name} v{b}"))
        else:
            result = {"a": f"{name} v{a}", "b": f"{name} v{b}", "rows": [], "levels": [], "gate": None}
            if va["evaluation"] and vb["evaluation"]:
                passed, reason = gate(EvalSummary(**vb["evaluation"]), EvalSummary(**va["evaluation"]),
                                      self.gate_margins(name, b))
                result["gate"] = {"passed": passed, "reason": reason}
        result["versions"] = {"a": va, "b": vb}
        result["full"] = full
        return result

    def compare_plot(self, name: str, a: int, b: int) -> Path:
        """The comparison's frontier plot (PNG: accuracy against tokens per mode, an arrow from a to b)."""
        result = self.compare(name, a, b)
        if not result["full"]:
            raise NotFound(f"{name} v{a} and v{b} need full evaluation reports for a plot")
        keys = "-".join(str(result["versions"][k]["register_run_id"]) for k in ("a", "b"))
        path = self.home / "dashboard" / "plots" / f"compare-{keys}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            plots.compare(result, path)
        return path

    def gate_preview(self, name: str, version: int, **margins: float | None) -> dict[str, Any]:
        """What the promotion gate says about `version` against the current champion (`margins`:
        acc_margin / tok_margin overrides, as `promote` takes them)."""

        info = self.version(name, version)
        champion = self.aliases(name).get(CHAMPION)
        if not info["evaluation"]:
            return {"passed": False, "champion": champion, "reason": "this version has no evaluation summary"}
        champ = self.version(name, champion)["evaluation"] if champion not in (None, int(version)) else None
        passed, reason = gate(EvalSummary(**info["evaluation"]), EvalSummary(**champ) if champ else None,
                              self.gate_margins(name, version, info=info, **margins))
        if champion == int(version):
            passed, reason = False, f"v{version} is already the champion"
        return {"passed": passed, "champion": champion, "reason": reason}

    @staticmethod
    def _reason(reason: str | None) -> str:
        reason = (reason or "").strip()
        if not reason:
            raise Invalid("a reason is required: it is recorded in the alias history")
        if len(reason) > 500:
            raise Invalid("the reason must be at most 500 characters")
        return reason

    def gate_margins(self, name: str, version: int | str, *, info: dict[str, Any] | None = None,
                     acc_margin: float | None = None, tok_margin: float | None = None) -> Margins:
        """The promotion gate's margins for `version`: those its pipeline run's gate used (recorded at
        registration from the config's `registry` section), else that section of the profile it was trained
        with; either margin overridable per call. So the CLI, the dashboard and the pipeline's register stage
        judge one model with the same margins."""
        info = info or self.version(name, version)
        if info.get("gate"):
            recorded = Margins(**info["gate"])
        else:
            try:
                recorded = Margins.from_config(load_config(info.get("profile") or "demo").registry)
            except KatError:  # a profile file that is gone: the defaults every shipped profile uses
                recorded = Margins.from_config(RegistryConfig())
        return replace(recorded, acc_margin=recorded.acc_margin if acc_margin is None else float(acc_margin),
                       tok_margin=recorded.tok_margin if tok_margin is None else float(tok_margin))

    def promote(self, name: str, version: int, reason: str | None, who: str | None = None, *,
                force: bool = False, acc_margin: float | None = None,
                tok_margin: float | None = None) -> dict[str, Any]:
        """Make `version` the champion: through the gate (`gate_margins`: the config's registry section,
        overridable here) unless `force`; `GateRefused` when the gate keeps it out. Returns the alias event
        (None in "event" when it already was champion)."""

        name, reason = self._model_name(name), self._reason(reason)
        info = self.version(name, version)
        margins = self.gate_margins(name, version, info=info, acc_margin=acc_margin, tok_margin=tok_margin)
        event = registry.promote(name, int(version), reason, who, gate_margins=margins, force=force,
                                 tracking_uri=self.tracking_uri)
        return {"event": asdict(event) if event else None, "aliases": self.aliases(name)}

    def rollback(self, name: str, reason: str | None, who: str | None = None) -> dict[str, Any]:

        name, reason = self._model_name(name), self._reason(reason)
        self._registered(name)
        event = registry.rollback(name, reason, who, tracking_uri=self.tracking_uri)
        return {"event": asdict(event), "aliases": self.aliases(name)}

