"""Datasets: the synthesized datasets of local runs, with their validation outcome."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kat_app.security import redact_text
from kat_app.service.base import ServiceBase
from kat_core.manifest import dir_digest, read_manifest


class DatasetsService(ServiceBase):
    def datasets(self, limit: int = 200) -> list[dict[str, Any]]:
        """The synthesized datasets of local runs (one entry per dataset digest, with the runs that made or
        used it), their validation outcome and a link target for the Great Expectations data docs."""

        found: dict[str, dict[str, Any]] = {}
        for info in self.local.list_runs(limit):
            stages = {s.name: s for s in info.stages}
            synth = stages.get("synthesize")
            if synth is None or "dataset" not in synth.outputs:
                continue
            path = synth.outputs["dataset"]
            manifest = read_manifest(Path(path)) or {}
            digest = dir_digest(Path(path)) if manifest else None
            entry = found.get(digest or path)  # the same data made again (another config) is one dataset
            if entry is None:
                entry = found[digest or path] = {
                    "path": path, "exists": Path(path).is_dir(), "runs": [], "digest": digest,
                    "records": manifest.get("records"), "items": manifest.get("items"),
                    "modes": (manifest.get("counts") or {}).get("mode"), "rejects": manifest.get("rejects"),
                    "created_at": manifest.get("created_at"), "config_hash": manifest.get("config_hash"),
                    "profile": info.profile, "validation": None,
                }
            entry["runs"].append(info.run_id)
            check = stages.get("validate")
            if entry["validation"] is None and check is not None:
                entry["validation"] = self._validation(info.run_id, check)
        return sorted(found.values(), key=lambda d: d.get("created_at") or "", reverse=True)

    @staticmethod
    def _validation(run_id: str, stage) -> dict[str, Any]:
        result: dict[str, Any] = {"status": stage.status, "run_id": run_id, "error": redact_text(stage.error or "")}
        report = stage.outputs.get("report")
        if report and (Path(report) / "validation.json").is_file():
            summary = json.loads((Path(report) / "validation.json").read_text())
            result.update({"success": summary.get("success"), "passed": summary.get("passed"),
                           "total": summary.get("total"),
                           "failed": [f.get("name", str(f)) if isinstance(f, dict) else str(f)
                                      for f in summary.get("failed") or []]})
            if (Path(report) / "docs" / "index.html").is_file():
                result["docs"] = f"/runs/{run_id}/files/validate/report/docs/index.html"
        return result

