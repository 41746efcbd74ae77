"""The KAT dashboard: one FastAPI service with a JSON REST API under `/api` and server-rendered pages
(Jinja2, a little hand-written JavaScript for live refresh), over the service layer
(`kat_app.service`) that the CLI uses too. `kat serve --port 8080` runs it with the local run
worker and the scheduler; see `app.create_app`."""

from kat_app.dashboard.app import create_app, serve

__all__ = ["create_app", "serve"]
