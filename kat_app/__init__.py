"""The application on top of the pipelines: the `kat` CLI, the service layer, the local run queue and
scheduler, and the dashboard. Imports point down: kat_app -> pipelines -> components -> kat_core."""
