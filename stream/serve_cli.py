"""``latent-stream serve``'s command line, generated from `ServeSettings`: one option per setting, with the
setting's description and default, so the help can never disagree with what the service does.

Loaded only when ``serve`` runs or its help is asked for (stream/cli.py lists it lazily): building the options
imports the settings and their validators, which ``latent-stream --help`` does not need.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo

from stream.cli import _run_service, _settings_or_exit, _setup_logging
from stream.config import ServeSettings, load_settings


def _option_type(annotation: Any) -> Any:
    """The command-line type of a setting: bool, int, float and Path as themselves, the rest as text (the
    settings validate choices; lists are comma-separated)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (bool, int, float, Path) else str


def shown_default(field: FieldInfo) -> str | bool:
    """What the help shows as a setting's default: its declared value; nothing where there is none (the
    description says what happens then)."""
    if field.default_factory is not None or field.default is None:
        return False
    return str(field.default)


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    option = typer.Option(help=field.description, show_default=shown_default(field))
    annotation = Annotated[_option_type(field.annotation) | None, option]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def serve(**values: Any) -> None:
    """The beamtime service: frames from ZeroMQ, points and Tiled URIs out over websockets.

    Every option is also settable as LATENT_STREAM_<NAME> or in the --config YAML file.
    """
    settings = _settings_or_exit(load_settings, **values)  # None: not given on the command line
    _setup_logging(settings.log_level)
    from stream.serve import serve as run_serve

    _run_service(lambda: run_serve(settings))


_PARAMETERS = [_option(name, field) for name, field in ServeSettings.model_fields.items()]
serve.__signature__ = inspect.Signature(_PARAMETERS, return_annotation=None)  # type: ignore[attr-defined]
serve.__annotations__ = {p.name: p.annotation for p in _PARAMETERS} | {"return": None}
