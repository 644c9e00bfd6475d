"""The run directory: what a stage writes there, in which order, and how a failed run leaves it.

Layout of `<run_dir>` (hydra's `hydra.run.dir`):
  config.yaml    the resolved config (a step of a pipeline or compare run: the config it runs, which reruns it
                 alone; parent_config.yaml beside it is the whole run's)
  run.log        the log of this run (appended on resume)
  metrics.json   the stage's result
  checkpoint/    the Hugging Face model + tokenizer a later stage starts from
  train_state/   model, optimizers, schedulers, step and RNG states for `resume=true`
  wandb/         the wandb run (logger=wandb)

While a run is open its directory is locked (`.lock`, an advisory lock the system drops when the process
ends, however it ends): a second run into the same directory, a `resume=true` started twice say, stops with
a one-line error instead of writing over the first one's train state.

Nothing is written before `RunDir.open()`, which a stage calls once its inputs are validated (config,
data, model); so a run that fails validation leaves the directory as it found it, and `remove_if_empty`
takes away the empty directory hydra created. Files are written atomically (temporary name, then
rename): an interrupted run never leaves a half-written metrics.json or checkpoint behind.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import OmegaConf

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded against a second process
    fcntl = None

from search.config import Config
from search.errors import UserError
from search.logger import LoggerFactory, NullLogger, RunLogger

__all__ = [
    "RunDir", "RESULTS", "changed_settings", "check_reusable", "schema_defaults", "previous_dir", "remove_if_empty", "replace_dir", "refuse_changed_steps", "run_step", "saved_train_state", "STATE_FILE",
    "warn_resumed_changes",
    "temp_beside", "write_atomic", "write_text_atomic",
]

log = logging.getLogger(__name__)

# Entries whose presence marks a directory as holding an earlier run's results.
RESULTS = ("metrics.json", "checkpoint", "train_state", "architecture.json", "quantized")
_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
LOCK = ".lock"
PARENT_CONFIG = "parent_config.yaml"  # in a step's directory: the config of the run it is part of


def temp_beside(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process: write there, then rename onto `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: readers see the old file or the whole new one."""
    tmp = temp_beside(path)
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory `tmp` to `target`, replacing an older `target`.

    A directory cannot be renamed over a non-empty one, so the old one steps aside first; a crash in
    between leaves `<target>.old`, which `previous_dir` finds.
    """
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def previous_dir(target: Path) -> Path | None:
    """`target`, or the `<target>.old` an interrupted `replace_dir` left; None when neither exists."""
    for path in (target, target.with_name(target.name + ".old")):
        if path.is_dir():
            return path
    return None


STATE_FILE = "loop.json"  # in a train state: the step it was saved at (search/loop.py writes it)


def saved_train_state(state_dir: Path) -> Path | None:
    """The train state a resume would restore from `state_dir` (or its interrupted replacement), if any: a
    folder whose STATE_FILE says its step, not what `drop_train_state` left of a finished one."""
    found = previous_dir(state_dir)
    return found if found is not None and (found / STATE_FILE).is_file() else None


def check_reusable(path: Path, resume: bool) -> None:
    """Refuse to run into a directory holding an earlier run's results, unless resuming it."""
    if resume or not path.is_dir():
        return
    found = [name for name in RESULTS if (path / name).exists()]
    if not found:  # a compare or pipeline run stopped part-way holds its results in its steps' folders
        found = sorted(str(p.relative_to(path)) for name in RESULTS for p in path.glob(f"*/**/{name}"))
        found = [p for p in found if not any(p.startswith(f"{q}/") for q in found)]  # not what a result holds
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise UserError(
            f"run directory {path} already holds a run ({', '.join(found[:3])}{more}); pass resume=true to "
            f"continue it, or choose another hydra.run.dir"
        )


def remove_if_empty(path: Path) -> None:
    """Remove the run directory only when nothing was written into it (never an earlier result)."""
    try:
        path.rmdir()
    except OSError:
        pass


class RunDir:
    """The run directory of one stage; a context manager that closes the logger and the log file."""

    def __init__(
        self,
        path: Path | str,
        config_yaml: str | None = None,
        logger_factory: LoggerFactory = lambda run_dir, config: NullLogger(),
        main_process: bool = True,
        before_writing: Callable[["RunDir"], None] | None = None,
        parent_config_yaml: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._config_yaml = config_yaml
        self._parent_config_yaml = parent_config_yaml  # a step's: the run it is part of, as it was configured
        self._logger_factory = logger_factory
        # called by `open` once the directory is locked and before config.yaml is written (a check that the run
        # may go on here: one that raises leaves the directory as it was)
        self._before_writing = before_writing
        self.main_process = main_process
        self.logger: RunLogger = NullLogger()
        self._handler: logging.Handler | None = None
        self._lock: Any = None
        self.opened = False

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def train_state(self) -> Path:
        return self.path / "train_state"

    def open(self) -> None:
        """Start writing: config.yaml, run.log, the tracker. Call once the inputs are validated."""
        if self.opened:
            return
        if self.main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire()
        if self._before_writing is not None:
            self._before_writing(self)
        self.opened = True
        if not self.main_process:
            return
        if self._config_yaml is not None:
            write_text_atomic(self.path / "config.yaml", self._config_yaml)
        if self._parent_config_yaml is not None:
            write_text_atomic(self.path / PARENT_CONFIG, self._parent_config_yaml)
        self._handler = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        self._handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(self._handler)
        config = OmegaConf.to_container(OmegaConf.create(self._config_yaml)) if self._config_yaml else {}
        self.logger = self._logger_factory(self.path, config)
        log.info("run directory %s", self.path)

    def _acquire(self) -> None:
        """Lock the directory for this process, or a one-line error naming the process that holds it."""
        if fcntl is None:
            return
        f = open(self.path / LOCK, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise UserError(f"run directory {self.path} is in use by another run ({owner}); wait for it to end, "
                            f"or choose another hydra.run.dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._lock = f

    def _release(self) -> None:
        if self._lock is None:
            return
        (self.path / LOCK).unlink(missing_ok=True)
        self._lock.close()  # closing the file drops the lock
        self._lock = None

    def child(self, name: str, config: Any = None) -> "RunDir":
        """The run directory of one step of a multi-stage run (pipeline, compare), in a sub-directory. Its
        config.yaml is `config` (the `Config` the step runs: its stage, model, budget, seed, ...), which reruns it
        alone; parent_config.yaml keeps this run's, against which a resumed run checks what changed."""
        own = self._config_yaml if config is None else OmegaConf.to_yaml(OmegaConf.structured(config))
        return RunDir(self.path / name, own, self._logger_factory, self.main_process,
                      parent_config_yaml=self._config_yaml)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """The `log(metrics, step)` callable stages hand to the training loop."""
        if self.main_process:
            self.logger.log(metrics, step)

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        assert self.opened, "RunDir.open() must come before the first write"
        path = self.path / name
        if self.main_process:
            write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
            log.info("wrote %s", path)
        return path

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        self.logger.finish()
        self.logger = NullLogger()
        self._release()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# settings that change how a run reports, checkpoints or computes, never its result (beyond float rounding)
_BOOKKEEPING = {"log_every", "log_mass_every", "checkpoint_every", "eval_every", "teacher_cache"}


def changed_settings(saved_yaml: str, current_yaml: str, sections: Sequence[str],
                     defaults_yaml: str | None = None) -> list[str]:
    """`key: saved -> current` for every setting under `sections` (top-level config keys) that differs.

    A key the saved config lacks (an option added after that run) counts as unchanged when the current
    value is the option's default in `defaults_yaml`: the older run behaved as the default does."""
    def flat(tree: Any, prefix: str) -> dict[str, Any]:
        if isinstance(tree, Mapping):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
        return {prefix: tree}

    saved, current, defaults = (OmegaConf.to_container(OmegaConf.create(text or '{}'))
                                for text in (saved_yaml, current_yaml, defaults_yaml))
    out = []
    for section in sections:
        a, b = flat(saved.get(section), section), flat(current.get(section), section)
        d = flat(defaults.get(section), section)
        out += [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and k.rsplit(".", 1)[-1] not in _BOOKKEEPING
                and not (k not in a and k in d and d[k] == b[k])]
    return out


@functools.cache
def schema_defaults() -> str:
    """The config schema's defaults as YAML (enums by name, as a run's config.yaml writes them)."""
    return OmegaConf.to_yaml(OmegaConf.structured(Config))


def run_step(run: RunDir, name: str, fn: Callable[[RunDir, bool], dict[str, Any]],
             settings: Sequence[str] = (), keep: Sequence[str] | None = None, config: Any = None) -> dict[str, Any]:
    """One step of a multi-stage run in `run/name`: skipped when its metrics.json exists (that result is
    returned), resumed when it holds a train state, else run; `fn(child, resume)` runs it. A finished
    step whose config.yaml differs from this run's under `settings` (top-level sections that decide its
    result) is still reused, with a warning that names the differences. With `keep` (file names), the
    step's train_state/ is cut down to those files once it has finished: it is never resumed again. `config`
    is the `Config` the step runs (its config.yaml; see `RunDir.child`)."""
    child = run.child(name, config)
    done = child.path / "metrics.json"
    if done.is_file():
        log.info("%s: done already (%s)", name, done)
        _warn_changed(run, child, name, settings, "was run with other settings", "its result is reused")
        return json.loads(done.read_text())
    resume = saved_train_state(child.train_state) is not None
    log.info("%s%s", name, " (resuming)" if resume else "")
    if resume:  # before `child` opens and writes this run's config.yaml over the one the train state came from
        _warn_changed(run, child, name, settings, "started with other settings",
                      "it resumes from its train state, which has them")
    with child:
        result = fn(child, resume)
    if keep is not None and child.main_process:
        drop_train_state(child.train_state, keep)
    return result


def warn_resumed_changes(run: RunDir, name: str, settings: Sequence[str]) -> None:
    """Stage `name` run alone with resume=true under other `settings` (top-level sections) than the run it
    continues. A finished run is refused (a UserError): resuming it would replace its result with one derived under
    the new settings from training done under the old. An unfinished one gets a warning: it continues from its
    train state and finishes under the new settings. Call before `run` writes the new config.yaml (as its
    `before_writing`: once the directory is locked, so that a run in use is reported as such first)."""
    changed = _changed(run, run.path / "config.yaml", settings)
    if not changed:
        return
    listed = _listed(changed)
    if (run.path / "metrics.json").is_file():  # what every stage writes last
        raise UserError(f"{name} in {run.path} finished with other settings ({listed}); resume=true would replace its "
                        f"result: give a new hydra.run.dir, or run with the settings it had")
    if saved_train_state(run.train_state) is not None:
        log.warning("%s started with other settings (%s); it continues from its train state, written under the old "
                    "ones, and finishes under the new: delete %s to rerun it", name, listed, run.path)


def refuse_changed_steps(run: RunDir, name: str, steps: Mapping[str, Sequence[str]]) -> None:
    """Run `name` resumed, whose finished steps (`steps`: sub-directory -> the sections that decide its result)
    would be reused: refused (a UserError) when one ran under other settings, as a finished stage run alone is.
    Its summary would report the old result under the new settings. Call as `run`'s `before_writing`."""
    for step, settings in steps.items():
        child = run.child(step)
        changed = _changed(run, _parent_config(child.path), settings) if (child.path / "metrics.json").is_file() else []
        if changed:
            raise UserError(f"{name} in {run.path}: its finished step {step} ran with other settings ({_listed(changed)}); "
                            f"resume=true would report that result under the new ones: give a new hydra.run.dir, "
                            f"or run with the settings it had")


def drop_train_state(state_dir: Path, keep: Sequence[str] = ()) -> None:
    """Delete `state_dir` (a finished step's train state) but for the files named in `keep`."""
    if not state_dir.is_dir():
        return
    for entry in state_dir.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    remove_if_empty(state_dir)


def _warn_changed(run: RunDir, child: RunDir, name: str, settings: Sequence[str], what: str, then: str) -> None:
    """Warn that step `name` in `child` ran (or began) under other `settings` than `run` has now."""
    changed = _changed(run, _parent_config(child.path), settings)
    if changed:
        log.warning("%s %s (%s); %s: delete %s to rerun it", name, what, _listed(changed), then, child.path)


def _parent_config(step: Path) -> Path:
    """The config of the run that a step directory is part of, as it was when the step ran: parent_config.yaml
    (a step written before it was kept: config.yaml, which was the run's then)."""
    return step / PARENT_CONFIG if (step / PARENT_CONFIG).is_file() else step / "config.yaml"


def _changed(run: RunDir, saved: Path, settings: Sequence[str]) -> list[str]:
    """The `settings` whose values in the `saved` config differ from `run`'s current ones ([] when either config
    is missing)."""
    if not settings or not saved.is_file() or run._config_yaml is None:
        return []
    return changed_settings(saved.read_text(), run._config_yaml, settings, schema_defaults())


def _listed(changed: Sequence[str]) -> str:
    """The first four changed settings, and how many more."""
    return "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
