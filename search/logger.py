"""Experiment tracking for the app: Weights & Biases, or nothing.

Stages never see wandb: they get a `RunLogger` (config once, `log(metrics, step)` per step, a summary
at the end) through `search.rundir.RunDir`. Without an API key (no WANDB_API_KEY and no ~/.netrc entry
for the wandb host) `mode=auto` runs offline into the run directory, so no network is needed; the run can
be uploaded later with `wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import urlparse

from search.config import LoggerConfig, LoggerKind, WandbMode
from search.errors import UserError

__all__ = ["RunLogger", "NullLogger", "WandbLogger", "LoggerFactory", "check_logger", "make_logger", "step_loggers",
           "wandb_mode"]

log = logging.getLogger(__name__)


class RunLogger(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def summary(self, metrics: Mapping[str, Any]) -> None: ...

    def image(self, name: str, path: Path) -> None: ...

    def table(self, name: str, csv_path: Path) -> None: ...

    def finish(self) -> None: ...


class NullLogger:
    """`logger=none`: the run still writes run.log and metrics.json."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def image(self, name: str, path: Path) -> None:
        pass

    def table(self, name: str, csv_path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """One wandb run, living in `<run_dir>/wandb/`. Several can be open at once: a multi-step run (pipeline,
    compare) keeps its own open while each step logs to a run of its own."""

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: Mapping[str, Any], name: str | None = None,
        group: str | None = None,
    ) -> None:
        import wandb  # imported here: `logger=none` runs never load it

        mode = wandb_mode(cfg.mode)
        check_logger(cfg)
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            dir=str(run_dir),
            name=name or run_dir.name,
            group=group,
            config=dict(config),
            mode=mode,
            reinit="create_new",  # never finish another open run (the multi-step run a step belongs to)
        )
        log.info("wandb run %s (mode %s) in %s/wandb", self._run.name, mode or "from WANDB_MODE", run_dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        for key, value in _flatten(metrics).items():
            self._run.summary[key] = value

    def image(self, name: str, path: Path) -> None:
        import wandb

        self._run.log({name: wandb.Image(str(path))})

    def table(self, name: str, csv_path: Path) -> None:
        import csv

        import wandb

        with Path(csv_path).open(newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            self._run.log({name: wandb.Table(columns=rows[0], data=rows[1:])})

    def finish(self) -> None:
        self._run.finish()


def wandb_mode(mode: WandbMode) -> str | None:
    """The `mode` argument of wandb.init; None lets wandb read $WANDB_MODE."""
    if mode is not WandbMode.auto:
        return mode.value
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if _has_api_key() else "offline"


def check_logger(cfg: LoggerConfig) -> None:
    """A wandb logger that must go online needs an API key: say so before the run starts, not in a traceback."""
    if cfg.kind is not LoggerKind.wandb:
        return
    mode = wandb_mode(cfg.mode) or os.environ.get("WANDB_MODE", "")
    if mode == "online" and not _has_api_key():
        raise UserError("logger.mode=online needs a wandb API key (WANDB_API_KEY, or `wandb login`); "
                        "log offline with logger.mode=offline (sync later with `wandb sync`) or use logger=none")


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host or "api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def make_logger(
    cfg: LoggerConfig, run_dir: Path, config: Mapping[str, Any], name: str | None = None, group: str | None = None
) -> RunLogger:
    """The tracker `cfg.kind` asks for, logging the resolved `config`."""
    builders = {LoggerKind.none: lambda: NullLogger(),
                LoggerKind.wandb: lambda: WandbLogger(cfg, run_dir, config, name, group)}
    return builders[cfg.kind]()


# what a RunDir opens its tracker with: its own directory and its config
LoggerFactory = Callable[[Path, Mapping[str, Any]], RunLogger]


def step_loggers(cfg: LoggerConfig, top: Path) -> LoggerFactory:
    """The trackers of one command's run directory `top` and of every step beneath it (pipeline, compare): each
    a run of its own, in its own directory, named after its path (`<top>/b2/s42/search`) and grouped under `top`'s
    name, so that a step's run never ends the command's."""
    def make(run_dir: Path, config: Mapping[str, Any]) -> RunLogger:
        step = run_dir.relative_to(top).as_posix()
        name = top.name if step == "." else f"{top.name}/{step}"
        return make_logger(cfg, run_dir, config, name=name, group=top.name)
    return make
