"""A Hydra sweeper plugin for sweeps that are not full cartesian products (`hydra/sweeper=cases`).

Hydra's basic sweeper multiplies every swept key. The CMU sampling ablation needs ancestral DDPM at
{100, ..., 1000} steps but DDIM / Euler / Heun at {10, 20, 50, 100}: a list of cases, each a set of
overrides, times the usual `params` product (and any sweep on the command line):

    hydra:
      sweeper:
        cases: ["sampler=ancestral sampler.steps=100", "sampler=ddim sampler.steps=10", ...]
        params: {seed: "0,1"}            # optional, crossed with every case

Before anything launches, every job's config is composed and checked as the job itself would check it
(diffusion_lab.jobcheck.check_job: the config schema, eval inputs and, for task=sample/evaluate, the sampler
against the checkpoint's own schedule: ancestral at 700 steps over a T=500 checkpoint). `invalid: drop`
(default) leaves such jobs out, one line each naming the job and why; `invalid: fail` refuses the whole
sweep in one line (exit 2). No job that would fail on its config is ever launched. Everything else
(batching, launching) is the basic sweeper's.
"""

import itertools
import logging
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional  # noqa: UP035  (OmegaConf structured configs need typing types)

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser


@dataclass
class CasesSweeperConf:
    _target_: str = "hydra_plugins.diffusion_lab_sweeper.cases_sweeper.CasesSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    cases: List[str] = field(default_factory=list)  # noqa: UP006
    invalid: str = "drop"  # drop: leave invalid jobs out (one line each) | fail: refuse the sweep (exit 2)


ConfigStore.instance().store(group="hydra/sweeper", name="cases", node=CasesSweeperConf, provider="diffusion_lab")
log = logging.getLogger(__name__)


class CasesSweeper(BasicSweeper):
    """BasicSweeper whose job list is `cases` x product(params, command-line sweeps), each job checked first."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 cases: list[str] | None = None, invalid: str = "drop") -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        if invalid not in ("drop", "fail"):
            print(f"error: hydra.sweeper.invalid={invalid}: expected drop or fail", file=sys.stderr)
            raise SystemExit(2)
        self.cases = [shlex.split(c) for c in (cases or [])]
        self.invalid = invalid

    def sweep(self, arguments: list[str]):
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for case in self.cases:  # fail early, naming the case, on a malformed override
            parser.parse_overrides(case)
        original = self.split_arguments

        def split(overrides, max_batch_size):
            (product,) = original(overrides, None)  # the params x command-line product, one batch
            jobs = [case + combo for case, combo in itertools.product(self.cases, product)] if self.cases else product
            jobs = self._valid_jobs(jobs)
            if max_batch_size is None:
                return [jobs]
            return [jobs[i: i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]

        self.split_arguments = split
        try:
            return super().sweep(arguments)
        finally:
            self.split_arguments = original

    def _valid_jobs(self, jobs: list[list[str]]) -> list[list[str]]:
        """The jobs whose composed config passes check_job; the others dropped (one line each) or refused."""
        from diffusion_lab.jobcheck import check_job  # lazy: plugin discovery must not import torch

        kept, dropped = [], []
        loader, cache = self.hydra_context.config_loader, {}
        for job in jobs:
            cfg = loader.load_sweep_config(self.config, list(job))
            reason = check_job(cfg, list(job), cache)
            (dropped if reason else kept).append((job, reason))
        common = set.intersection(*(set(job) for job in jobs)) if len(jobs) > 1 else set()
        for job, reason in dropped:  # named by what sets it apart (the case and swept values), not ckpt=... etc.
            line = f"job `{' '.join(o for o in job if o not in common)}`: {reason}"
            if self.invalid == "fail":
                print(f"error: {line} (hydra.sweeper.invalid=fail: nothing launched)", file=sys.stderr)
                raise SystemExit(2)
            log.warning("sweep: not launching %s", line)
        if not kept:
            print(f"error: every one of the {len(jobs)} sweep jobs is invalid (first: {dropped[0][1]}); "
                  "nothing launched", file=sys.stderr)
            raise SystemExit(2)
        if dropped:
            log.warning("sweep: launching %d of %d jobs (%d invalid, left out)", len(kept), len(jobs), len(dropped))
        return [job for job, _ in kept]
