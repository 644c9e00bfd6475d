"""`python -m search`: compose the config -> typed `Config` -> seed -> logger -> run one stage.

    python -m search                                  # fine-tune BERT-base on SST-2 (hub)
    python -m search experiment=quickstart            # MiniLM-L6 on SST-2, minutes on a CPU
    python -m search stage=eval eval.checkpoint=runs/finetune/sst2/<date>/checkpoint
    python -m search stage=export export.run_dir=runs/qat/sst2/<date>   # bit-packed folder

The run directory is hydra's `hydra.run.dir`. Bad input (an unknown task or model, a missing or
malformed data file, a bad config value, a missing checkpoint) ends the run with one line on stderr,
`error: <problem>; <fix>`, exit code 2, and no run directory left behind; an earlier run's results are
never removed. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import hydra
from accelerate.utils import set_seed
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from search.config import Config, Stage, register, to_config
from search.compare import run_compare
from search.dnas import run_search
from search.errors import USER_ERRORS, UserError, first_line, one_line
from search.evaluate import run_eval
from search.export import run_export
from search.finetune import finetune
from search.hawq_stage import run_hawq
from search.logger import check_logger, step_loggers
from search.progress import configure as configure_progress
from search.pipeline import run_pipeline
from search.qat import run_qat
from search.rundir import RunDir, check_reusable, refuse_changed_steps, remove_if_empty, warn_resumed_changes

__all__ = ["CONF_DIR", "STAGES", "check_group_choices", "check_overrides", "run_stage", "main"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def _finetune(c: Config, run: RunDir) -> dict[str, Any]:
    return finetune(
        c.model, c.task, c.finetune, c.eval, run,
        seed=c.seed, max_steps=c.max_steps, max_eval_examples=c.max_eval_examples,
        mixed_precision=c.mixed_precision, cache_dir=c.cache_dir, resume=c.resume,
        progress_bar=c.progress_bar,
    )


def _eval(c: Config, run: RunDir) -> dict[str, Any]:
    return run_eval(
        c.model, c.task, c.eval, run,
        seed=c.seed, max_eval_examples=c.max_eval_examples, mixed_precision=c.mixed_precision,
        cache_dir=c.cache_dir, space=c.space,
    )


def _search(c: Config, run: RunDir) -> dict[str, Any]:
    return run_search(
        c.model, c.task, c.space, c.search, c.budget, c.eval, run,
        seed=c.seed, max_steps=c.max_steps, max_eval_examples=c.max_eval_examples,
        mixed_precision=c.mixed_precision, cache_dir=c.cache_dir, resume=c.resume, progress_bar=c.progress_bar,
    )


def _qat(c: Config, run: RunDir) -> dict[str, Any]:
    return run_qat(
        c.model, c.task, c.space, c.qat, c.eval, run,
        seed=c.seed, max_steps=c.max_steps, max_eval_examples=c.max_eval_examples,
        mixed_precision=c.mixed_precision, cache_dir=c.cache_dir, resume=c.resume, progress_bar=c.progress_bar,
    )


def _hawq(c: Config, run: RunDir) -> dict[str, Any]:
    return run_hawq(
        c.model, c.task, c.space, c.hawq, c.budget, c.eval, run,
        seed=c.seed, max_eval_examples=c.max_eval_examples, mixed_precision=c.mixed_precision,
        cache_dir=c.cache_dir, progress_bar=c.progress_bar,
    )


def _export(c: Config, run: RunDir) -> dict[str, Any]:
    return run_export(
        c.export, c.task, c.eval, run,
        seed=c.seed, max_eval_examples=c.max_eval_examples, mixed_precision=c.mixed_precision, cache_dir=c.cache_dir,
    )


STAGES: dict[Stage, Callable[[Config, RunDir], dict[str, Any]]] = {
    Stage.finetune: _finetune,
    Stage.eval: _eval,
    Stage.search: _search,
    Stage.qat: _qat,
    Stage.hawq: _hawq,
    Stage.compare: run_compare,
    Stage.export: _export,
    Stage.pipeline: run_pipeline,
}


# what decides a stage's result when it runs alone: resuming its train state under other values warns, and
# a finished run is refused (compare reuses its finished steps with a warning: a comparison grows by budgets)
RESUME_SETTINGS: dict[Stage, tuple[str, ...]] = {
    Stage.finetune: ("model", "task", "finetune"),
    Stage.search: ("model", "task", "space", "search", "budget"),
    Stage.qat: ("model", "task", "space", "qat"),
    Stage.hawq: ("model", "task", "space", "hawq", "budget"),
    Stage.eval: ("model", "task", "space", "eval"),
}
# a pipeline's steps and what decides each: the search sets the QAT's architecture and HAWQ-V2's size. One that
# finished under other values refuses the resumed pipeline; steps it adds (pipeline.hawq=true) are free to
_SEARCHED = RESUME_SETTINGS[Stage.search]
PIPELINE_STEPS: dict[str, tuple[str, ...]] = {
    "finetune": RESUME_SETTINGS[Stage.finetune], "search": _SEARCHED, "qat": _SEARCHED + ("qat",),
    "hawq": _SEARCHED + ("hawq",), "hawq_qat": _SEARCHED + ("hawq", "qat"),
}


def check_resumed(run: RunDir, stage: Stage) -> None:
    """Before a resumed run writes anything: refuse one whose finished result other settings would misreport."""
    if stage is Stage.pipeline:
        refuse_changed_steps(run, "stage=pipeline", PIPELINE_STEPS)
    else:
        warn_resumed_changes(run, f"stage={stage}", RESUME_SETTINGS.get(stage, ()))


def check_group_choices(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """`group=option` overrides must name a file of the group (hydra's own message is a screenful)."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"}
    for arg in overrides:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key not in groups or value == "null" or not re.fullmatch(r"[\w.-]+", value):
            continue  # not a plain group choice (a sweep, a key.path=value, ...): hydra checks it
        if not (conf_dir / key / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            raise UserError(f"unknown {key} {value!r}; choose one of: {', '.join(options)}")


def _keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config tree, groups as well as their leaves."""
    if not isinstance(node, dict):
        return []
    return [k for key, value in node.items() for k in (f"{prefix}{key}", *_keys(value, f"{prefix}{key}."))]


MULTIRUN_FLAGS = ("-m", "--multirun")
LISTABLE_SWEEPS = (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.RANGE_SWEEP)


def _sweep_variants(overrides: Sequence[str]) -> list[list[str]] | None:
    """Enough of a `-m` sweep's command lines that each swept value is composed once: every sweep at its first
    value, then each further value of each sweep on its own. None for sweeps that cannot be listed without the
    sweeper (intervals, globs, an empty range): those are left to hydra."""
    choices: list[list[str]] = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        if override.value_type not in LISTABLE_SWEEPS:
            return None
        key = override.get_key_element()
        values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        if not values:
            return None
        choices.append(values)
    first = [values[0] for values in choices]
    return [first] + [first[:i] + [value] + first[i + 1:] for i, values in enumerate(choices) for value in values[1:]]


def check_overrides(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Compose the config before hydra does, so that a value of the wrong type, an unknown option or a
    malformed override is one line (hydra's own report is several, and names no fix). Under -m, each swept
    value is composed once (a sweep of n values and m values costs 1 + (n-1) + (m-1) compositions). Command
    lines with other flags (--cfg, --help, ...) and hydra.* settings are left to hydra."""
    check_group_choices(overrides, conf_dir)
    multirun = any(arg in MULTIRUN_FLAGS for arg in overrides)
    args = [arg for arg in overrides if arg not in MULTIRUN_FLAGS]
    if any(arg.startswith("-") for arg in args):
        return
    plain = [arg for arg in args if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        try:
            variants = _sweep_variants(plain) if multirun else [plain]
            for variant in variants or []:
                if multirun:  # swept group choices; the plain ones were checked above
                    check_group_choices(variant, conf_dir)
                compose("config", overrides=variant)
        except OverrideParseException as e:
            raise UserError(f"{e.override}: {first_line(e)}; write overrides as key=value, lists as key=[a,b]") from None
        except ConfigCompositionException as e:
            message, cause = first_line(e), e.__cause__
            quoted = message.split("'")[1] if message.count("'") >= 2 else message  # the key or override named
            if message.startswith("Could not override '"):  # an option the config does not have
                known = _keys(OmegaConf.to_container(compose("config"), resolve=False))
                known = [k for k in known if not quoted.startswith(f"{k}.")]  # not the group the key is in
                close = difflib.get_close_matches(quoted, known, n=3)
                hint = f"did you mean {' or '.join(close)}?" if close else "README.md lists the options"
                raise UserError(f"unknown option {quoted}; {hint}") from None
            if message.startswith("Ambiguous value for argument '"):
                raise UserError(f"{quoted} is ambiguous; write a list as key=[a,b], a string as key='a,b', "
                                f"or sweep it with -m") from None
            detail = f": {first_line(cause)}" if cause is not None else ""
            raise UserError(f"{message.removeprefix('Error merging override ')}{detail}; fix the value") from None


def run_stage(cfg: DictConfig, run_dir: Path) -> int:
    """Run the composed `cfg` into `run_dir`; the exit code (non-zero after a one-line error)."""
    try:
        config = to_config(cfg)
        stage = STAGES[config.stage]
        check_logger(config.logger)
        configure_progress(config.progress_bar)
        check_reusable(run_dir, config.resume)
        set_seed(config.seed)
        run = RunDir(
            run_dir,
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            logger_factory=step_loggers(config.logger, run_dir),
            before_writing=(lambda r: check_resumed(r, config.stage)) if config.resume else None,
        )
        with run:
            stage(config, run)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        remove_if_empty(run_dir)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"error: interrupted; continue with resume=true hydra.run.dir={run_dir}", file=sys.stderr)
        remove_if_empty(run_dir)
        return EXIT_INTERRUPTED
    return 0


register()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run_stage(cfg, Path(HydraConfig.get().runtime.output_dir))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()
