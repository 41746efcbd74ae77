"""Config and forms: the profiles, checking a run's config before anything is queued, and the settings of a
profile as form fields (what the dashboard's New run page is built from)."""

from __future__ import annotations

import typing
from typing import Any

import yaml
from pydantic import BaseModel

from kat_app.security import secret_name
from kat_app.service.base import ServiceBase, clean_overrides
from kat_core.config import KatConfig, available_profiles, load_config
from kat_core.errors import Invalid, KatError, NotFound
from kat_core.manifest import config_hash


def _yaml_text(value: Any) -> str:
    """A config value the way `--set key=VALUE` takes it back (YAML flow style, one line)."""
    if isinstance(value, str) and value:
        try:
            if yaml.safe_load(value) == value:  # a plain string that reads back as itself
                return value
        except yaml.YAMLError:
            pass
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("...").strip()



class FormsService(ServiceBase):
    def profiles(self) -> list[str]:
        return available_profiles()

    def check_config(self, profile: str, overrides: list[str] | str | None = None, *,
                     profile_files: bool = False) -> dict[str, Any]:
        """The config a run would use, or Invalid naming the bad key; returns its hash and profile. Only the
        shipped profiles, unless `profile_files` (the CLI, on its user's own machine, may name a YAML file)."""
        overrides = clean_overrides(overrides)
        if profile not in self.profiles() and not (profile_files and profile.endswith((".yaml", ".yml"))):
            raise Invalid(f"unknown profile {profile!r}; choose one of: {', '.join(self.profiles())}")
        try:
            config = load_config(profile, overrides)
            digest = config_hash(config)  # as JSON: an int of over 4300 digits cannot be written there
        except KatError as e:  # config.parse_override reads the values (nesting, dates, digits), the schema
            raise Invalid(str(e)) from None  # checks them (registry.model_name included)
        except ValueError as e:  # a YAML 1.1 base-60 int builds without a string, then JSON cannot write it
            raise Invalid(f"an override's value cannot be read: {e}") from None
        return {"profile": profile, "overrides": overrides, "config_hash": digest, "purpose": config.purpose}

    def config_fields(self, profile: str) -> list[dict[str, Any]]:
        """Every setting of `profile` for a form: dotted key, section, the profile's value as `--set` text,
        its kind (bool, int, float, choice, text) and choices, description, and whether it is a secret."""
        if profile not in self.profiles():
            raise NotFound(f"unknown profile {profile!r}; choose one of: {', '.join(self.profiles())}")
        data = load_config(profile).model_dump(mode="json", by_alias=True)
        fields: list[dict[str, Any]] = []

        def walk(model: type[BaseModel], values: dict[str, Any], prefix: str, section: str) -> None:
            for name, info in model.model_fields.items():
                key = info.alias or name
                if not prefix and key in ("profile", "purpose"):
                    continue
                ann, value = info.annotation, values.get(key)
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    walk(ann, value or {}, f"{prefix}{key}.", section or key)
                    continue
                args = typing.get_args(ann)
                literal = typing.get_origin(ann) is typing.Literal
                kind = ("choice" if literal else "bool" if ann is bool else "int" if ann is int
                        else "float" if ann is float else "text")
                fields.append({
                    "key": f"{prefix}{key}", "section": section or "general", "value": _yaml_text(value),
                    "kind": kind, "choices": [_yaml_text(a) for a in args] if literal else None,
                    "description": info.description or "", "secret": secret_name(key),
                })

        walk(KatConfig, data, "", "")
        for f in fields:
            if f["secret"]:
                f["value"] = "" if f["value"] in ("null", "") else "***"
        return fields

    def overrides_from_form(self, profile: str, values: dict[str, str], extra: str = "") -> list[str]:
        """The `key=value` overrides a form submits: each field whose text differs from the profile's, then
        the free-form extra lines (which win, being last)."""
        out = []
        for f in self.config_fields(profile):
            given = values.get(f["key"])
            if given is None:
                continue
            given = given.strip()
            if f["secret"] and given in ("", "***"):
                continue
            if given != f["value"]:
                out.append(f"{f['key']}={given}")
        return out + clean_overrides(extra)

