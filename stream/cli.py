"""The ``latent-stream`` command line.

``simulate`` and ``demo`` live here; ``serve`` (its options generated from the settings: stream/serve_cli.py),
the model commands (train, export, fit, evaluate), replay/record and bench are registered lazily: their modules
(torch, tiled, umap...) are imported only when that command runs, so ``latent-stream --help`` is fast and never
imports torch.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

log = logging.getLogger("latent_stream")


@dataclass(frozen=True, slots=True)
class _Lazy:
    module: str
    attr: str
    help: str


# name -> where it lives. The attribute is a typer app or a plain typer-style function.
LAZY_COMMANDS: dict[str, _Lazy] = {
    "serve": _Lazy("stream.serve_cli", "serve", "The beamtime service: frames in, points and Tiled URIs out."),
    "train": _Lazy("operators.model.cli", "train", "Train the C-VAE on frames."),
    "export": _Lazy("operators.model.cli", "export", "Export the encoder to ONNX / TorchScript."),
    "fit": _Lazy("operators.model.cli", "fit", "Fit the projection and clustering; write a bundle."),
    "evaluate": _Lazy("operators.model.cli", "evaluate", "Evaluate a bundle on labelled synthetic scans."),
    "replay": _Lazy("stream.replay", "replay", "Replay a recorded scan over ZeroMQ."),
    "adapt": _Lazy("stream.adapt", "adapt", "Fit a map on recorded frames with a bundle's encoder; write a bundle."),
    "record": _Lazy("stream.replay", "record", "Save a synthetic scan to disk, for replay."),
    "verify": _Lazy("stream.replay", "verify", "Report per run frames sent, processed, stored, lost."),
    "bench": _Lazy("benchmarks.cli", "bench", "Run the benchmarks and write JSON results."),
}


def _load_command(name: str, spec: _Lazy) -> click.Command:
    try:
        obj = getattr(importlib.import_module(spec.module), spec.attr)
    except (ImportError, AttributeError) as exc:
        raise click.UsageError(f"command {name!r} is not available in this installation ({exc})") from None
    if isinstance(obj, typer.Typer):
        command = typer.main.get_command(obj)
    else:
        single = typer.Typer(add_completion=False, rich_markup_mode=None)  # plain help, like the group's
        single.command(name, help=None if obj.__doc__ else spec.help)(obj)
        command = typer.main.get_command(single)
    command.name = name
    return command


class _LazyGroup(TyperGroup):
    """Lists lazy commands with their stored help; imports a module only when its command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            return _load_command(cmd_name, LAZY_COMMANDS[cmd_name])
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                rows.append((name, self.commands[name].get_short_help_str(120)))
            else:
                rows.append((name, LAZY_COMMANDS[name].help))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    cls=_LazyGroup,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: rich help would load every lazy command to list it
    help="Real-time latent-space streaming of X-ray detector frames: ZeroMQ in, C-VAE + UMAP + online "
    "clustering, websockets out.",
)


def _setup_logging(level: str) -> None:
    from operators.log_safety import line_safe_handler

    # sender strings (run ids, names) reach log messages: one record stays one line
    logging.basicConfig(
        level=level.upper(),
        handlers=[line_safe_handler("%(asctime)s %(levelname)-7s %(name)s: %(message)s", sys.stderr)],
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Tiled request drowns the service's own


def _settings_or_exit(factory: Any, **values: Any) -> Any:
    from pydantic import ValidationError

    try:
        return factory(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from None
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from None


def _run_service(coro_factory: Any) -> None:
    """Run until the service stops; a clean stop (Ctrl-C, SIGTERM) exits 0 without a traceback."""
    from stream.serve import ServeError

    try:
        asyncio.run(coro_factory())
    except ServeError as exc:
        log.error("%s", exc)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # Ctrl-C before the service installed its own handlers
        log.info("interrupted during start-up")
    # Everything is stopped and closed (Tiled child, sockets, threads). Interpreter finalisation of the
    # JIT-compiled model side (numba/LLVM) alone takes seconds on a busy machine; skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def simulate(
    zmq: Annotated[str, typer.Option(help="Address to bind.")] = "tcp://127.0.0.1:5000",
    zmq_pattern: Annotated[str, typer.Option(help="push (lossless) | pub.")] = "push",
    frames: Annotated[int, typer.Option(min=0, help="Frames in the scan.")] = 200,
    rate: Annotated[float, typer.Option(help="Frames per second; 0 = as fast as the receiver takes them.")] = 10.0,
    scenario: Annotated[str, typer.Option(help="Synthetic scenario (stream.synthetic.SCENARIOS).")] = "film_formation",
    seed: Annotated[int, typer.Option(help="Random seed of the scan.")] = 0,
    run_id: Annotated[str | None, typer.Option(help="Run id of the start document [generated].")] = None,
    wire_format: Annotated[
        str, typer.Option("--format", help="msgpack (arroyo) | stream2 (DECTRIS stream v2, EIGER2 X 4M frames).")
    ] = "msgpack",
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """A synthetic beamline: streams one scan (start, events, stop) over ZeroMQ."""
    if zmq_pattern not in ("push", "pub"):
        raise typer.BadParameter("zmq-pattern must be push or pub")
    if wire_format not in ("msgpack", "stream2"):
        raise typer.BadParameter("format must be msgpack or stream2")
    _setup_logging(log_level)
    from stream.simulate import simulate as run_simulate

    try:
        report = asyncio.run(
            run_simulate(zmq, pattern=zmq_pattern, frames=frames, rate=rate, scenario=scenario, seed=seed,
                         run_id=run_id, wire_format=wire_format)  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    except KeyboardInterrupt:
        log.info("interrupted")
        raise typer.Exit(130) from None
    typer.echo(f"run {report.run_id}: sent {report.frames} frames in {report.seconds:.1f} s ({report.rate:.1f} Hz)")


@app.command()
def demo(
    frames: Annotated[int, typer.Option(min=1, help="Frames per synthetic scan.")] = 300,
    rate: Annotated[float, typer.Option(help="Frames per second.")] = 10.0,
    seed: Annotated[int, typer.Option(help="Seed of the first scan.")] = 0,
    port: Annotated[int, typer.Option(help="HTTP/websocket port.")] = 8765,
    tiled_port: Annotated[int, typer.Option(help="Port of the embedded Tiled server.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Where embedded Tiled keeps data.")] = Path("data"),
    bundle: Annotated[Path | None, typer.Option(help="Model bundle [the shipped default].")] = None,
    wire_format: Annotated[
        str, typer.Option("--format", help="Beamline wire format: msgpack | stream2 (DECTRIS stream v2).")
    ] = "msgpack",
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Everything on embedded defaults: service, embedded Tiled, live page, simulated beamline."""
    if wire_format not in ("msgpack", "stream2"):
        raise typer.BadParameter("format must be msgpack or stream2")
    _setup_logging(log_level)
    from stream.demo import demo as run_demo
    from stream.demo import demo_settings

    settings = _settings_or_exit(
        demo_settings, port=port, tiled_port=tiled_port, data_dir=data_dir, bundle=bundle, log_level=log_level,
        wire_format=wire_format,
    )
    _run_service(lambda: run_demo(settings, frames=frames, rate=rate, seed=seed))


def main() -> None:  # pragma: no cover - the console script calls `app`
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
