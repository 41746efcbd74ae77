"""The platform's service layer: what the dashboard's pages, its REST API and the `kat` CLI's run, model and
schedule commands all call, so each rule lives once.

    svc = Service()                                   # KAT_HOME, MLflow from MLFLOW_TRACKING_URI, KFP from KFP_HOST
    svc.submit_run("smoke", ["train.steps=10"])       # local: prepared and queued; the run worker executes it
    svc.get_run(run_id); svc.cancel_run(run_id); svc.run_log(run_id); svc.run_report(run_id)
    svc.versions("kat"); svc.compare("kat", 1, 2); svc.promote("kat", 2, reason="...")
    svc.create_schedule("0 3 * * *", "demo", only_if_data_changed=True); svc.trigger_schedule(id)
    svc.datasets()

One module per resource: `forms` (profiles, config checks, form fields), `runs`, `models`, `schedules`,
`datasets`; `base` holds the plumbing. Runs are reached through the run back ends of `pipelines/` behind
their one interface, models through `kat_core.platform.registry`, local schedules through `kat_app.schedules`.
Errors are the typed KatErrors of `kat_core.errors` (`NotFound`, `Invalid`, `Conflict`, `GateRefused`),
raised where they happen, so the web layer answers 404/422/409 and the CLI prints one line.
"""


from kat_app.service.base import MODEL_NAME, RUN_ID, clean_overrides
from kat_app.service.datasets import DatasetsService
from kat_app.service.forms import FormsService
from kat_app.service.models import ModelsService
from kat_app.service.runs import LOG_MARK, PLOTTED, RunsService
from kat_app.service.schedules import SchedulesService
from kat_core.errors import Conflict, GateRefused, Invalid, NotFound

__all__ = ["LOG_MARK", "MODEL_NAME", "PLOTTED", "RUN_ID", "Conflict", "GateRefused", "Invalid", "NotFound",
           "Service", "clean_overrides"]


class Service(RunsService, ModelsService, SchedulesService, DatasetsService, FormsService):
    """Every resource of the platform, for the dashboard's pages, its REST API and the CLI."""
