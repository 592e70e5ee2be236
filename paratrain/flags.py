"""Command-line flags for pydantic-settings fields: each flag's help, environment variable and default come
from the field, so they are written once, in the settings class."""

from __future__ import annotations

import argparse
from typing import Any


def add_settings_flag(parser: argparse.ArgumentParser, flag: str, settings_cls: Any, field: str,
                      default_text: str | None = None, **kwargs: Any) -> None:
    """`flag` overrides `settings_cls.<field>` (dest=field, None when not given, so the environment and the
    default still apply). `default_text` describes a default made by a factory (e.g. "hostname")."""
    info = settings_cls.model_fields[field]
    env = f"{settings_cls.model_config.get('env_prefix', '')}{field}".upper()
    default = default_text if default_text is not None else info.default
    parser.add_argument(flag, dest=field, default=None,
                        help=f"{info.description or field} (env {env}; default {default})", **kwargs)


def settings_overrides(args: argparse.Namespace, fields: list[str]) -> dict[str, Any]:
    """The given flags' values by field name (flags left out are not overrides)."""
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
