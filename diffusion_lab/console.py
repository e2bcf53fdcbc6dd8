"""What a run shows on the console and keeps in run.log.

The console carries what a user acts on (config errors, progress, results); run.log in the run dir keeps all
of it plus what scrolls by: Python logging, Lightning's messages (its logger does not propagate to the root
logger when it was imported before logging was configured, so it gets the file handler itself), warnings
(logging.captureWarnings) and the traceback of a failed run (the console shows one line).
Library lines that carry nothing for a user are dropped at their source (see quiet_libraries).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm.auto import tqdm

RUN_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")

# Lightning 2.6 advertises its cloud logger at every Trainer construction ("💡 Tip: ... litlogger"), lists
# accelerators the machine does not have, and restates limit_val_batches; the GPU line stays (used or not).
_DROPPED_INFO = ("try installing [litlogger]", "Skipping setting a default `ModelSummary` callback",
                 "TPU available: False", "HPU available: False",
                 "was configured so 100% of the batches will be used")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _DROPPED_INFO)


_DROP = _DropLines()


def quiet_libraries() -> None:
    """Drop the library lines that are noise for a user of this suite (idempotent)."""
    source = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info logs
    if _DROP not in source.filters:
        source.addFilter(_DROP)
    # `import lightning` gives its logger a stderr handler and leaves it propagating: with Hydra's console
    # handler on the root logger every Lightning line would print twice. Lightning's own compact handler
    # keeps them (once); attach_run_log adds run.log to it.
    lightning = logging.getLogger("lightning")
    if any(not _is_run_log(h) for h in lightning.handlers) and logging.getLogger().handlers:
        lightning.propagate = False
    _follow_run_log()


def _follow_run_log() -> None:
    """Lightning's non-propagating loggers get the root's run.log handler (they never reach the root)."""
    handler = next((h for h in logging.getLogger().handlers if _is_run_log(h)), None)
    if handler is None:
        return
    for logger in map(logging.getLogger, LIGHTNING_LOGGERS):
        if not logger.propagate and handler not in logger.handlers:
            logger.addHandler(handler)
    # Lightning 2.6's own pytree helper uses a name torch 2.13 deprecated: a FutureWarning at the first batch
    # that no user code can act on (Lightning's to fix).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # The model summary warns that it sizes bf16-mixed / 16-mixed models as 32-bit: mixed precision keeps fp32
    # weights, so 32 bits is right (true half precisions, 16-true / bf16-true, still warn).
    warnings.filterwarnings("ignore", message=r"Precision (bf)?16-mixed is not supported by the model summary")


def _is_run_log(handler: logging.Handler) -> bool:
    return getattr(handler, "_diffusion_lab_run_log", False)


def detach_run_log() -> None:
    """Close the run.log handler of an earlier run in this process (a sweep's previous job), so nothing of the
    next job is written into it before that job has claimed its own dir."""
    for logger in (logging.getLogger(), *map(logging.getLogger, LIGHTNING_LOGGERS)):
        for old in [h for h in logger.handlers if _is_run_log(h)]:
            logger.removeHandler(old)
            old.close()


def attach_run_log(path) -> logging.Handler:
    """Send every log record (root and Lightning's non-propagating loggers) and every warning to `path`
    as well, replacing the handler of an earlier run in this process (sweeps run jobs one after another)."""
    detach_run_log()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(RUN_LOG_FORMAT))
    handler._diffusion_lab_run_log = True
    logging.getLogger().addHandler(handler)
    _follow_run_log()
    logging.captureWarnings(True)  # warnings -> the "py.warnings" logger -> console and run.log
    return handler


def log_failure(exc: BaseException) -> None:
    """The full traceback of a failed run into run.log only (the console shows the one-line error)."""
    handler = next((h for h in logging.getLogger().handlers if _is_run_log(h)), None)
    if handler is None:
        return
    record = logging.LogRecord("diffusion_lab", logging.ERROR, __file__, 0, "run failed: %s: %s",
                               (type(exc).__name__, exc), (type(exc), exc, exc.__traceback__))
    handler.handle(record)


def progress(total: int, desc: str, unit: str = "it", enabled: bool | None = None) -> tqdm:
    """A progress bar on stderr for long loops outside Lightning's (sampling, Inception features).

    enabled=None: shown on a terminal only, so logs of batch jobs stay free of carriage-return spam (the caller
    logs one line saying what runs); DIFFUSION_LAB_PROGRESS=1 shows them anywhere, =0 nowhere."""
    if enabled is None:
        forced = os.environ.get("DIFFUSION_LAB_PROGRESS", "")
        enabled = forced == "1" if forced in ("0", "1") else sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr)
