"""The REST API's request bodies: strict (an unknown field is an error), bounded."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRequest(_Body):
    profile: str = Field(min_length=1, max_length=200)
    overrides: list[str] = Field(default_factory=list, max_length=200)
    backend: Literal["local", "kubeflow"] = "local"
    name: str | None = Field(None, max_length=100)


class ConfigCheck(_Body):
    profile: str = Field(min_length=1, max_length=200)
    overrides: list[str] = Field(default_factory=list, max_length=200)


class PromoteRequest(_Body):
    version: int = Field(ge=1)
    reason: str = Field(min_length=1, max_length=500)
    force: bool = False
    who: str | None = Field(None, max_length=100)


class RollbackRequest(_Body):
    reason: str = Field(min_length=1, max_length=500)
    who: str | None = Field(None, max_length=100)


class ScheduleRequest(_Body):
    cron: str = Field(min_length=1, max_length=100)
    profile: str = Field(min_length=1, max_length=200)
    overrides: list[str] = Field(default_factory=list, max_length=200)
    name: str | None = Field(None, max_length=100)
    backend: Literal["local", "kubeflow"] = "local"
    only_if_data_changed: bool = False


