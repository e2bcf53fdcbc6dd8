"""A Hydra sweeper plugin for sweeps that are not full cartesian products (`hydra/sweeper=cases`).

Hydra's basic sweeper multiplies every swept key. The CMU sampling ablation needs ancestral DDPM at
{100, ..., 1000} steps but DDIM / Euler / Heun at {10, 20, 50, 100}: a list of cases, each a set of
overrides, times the usual `params` product (and any sweep on the command line):

    hydra:
      sweeper:
        cases: ["sampler=ancestral sampler.steps=100", "sampler=ddim sampler.steps=10", ...]
        params: {seed: "0,1"}            # optional, crossed with every case

Everything else (batching, launching, validation) is the basic sweeper's.
"""

import itertools
import shlex
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


ConfigStore.instance().store(group="hydra/sweeper", name="cases", node=CasesSweeperConf, provider="diffusion_lab")


class CasesSweeper(BasicSweeper):
    """BasicSweeper whose job list is `cases` x product(params, command-line sweeps)."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 cases: list[str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.cases = [shlex.split(c) for c in (cases or [])]

    def sweep(self, arguments: list[str]):
        if not self.cases:
            return super().sweep(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for case in self.cases:  # fail early, naming the case, on a malformed override
            parser.parse_overrides(case)
        original = self.split_arguments

        def split(overrides, max_batch_size):
            (product,) = original(overrides, None)  # the params x command-line product, one batch
            jobs = [case + combo for case, combo in itertools.product(self.cases, product)]
            if max_batch_size is None:
                return [jobs]
            return [jobs[i: i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]

        self.split_arguments = split
        try:
            return super().sweep(arguments)
        finally:
            self.split_arguments = original
