# diffusion-lab developer commands. Every target that needs Python depends on the venv stamp,
# so `make run` / `make test` on a fresh clone install first and are fast no-ops afterwards.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
PYTEST_ARGS ?=
LOGDIR  ?= outputs
TB_HOST ?= localhost
TB_PORT ?= 6006

.PHONY: install run test test-slow lint format tensorboard bench clean sweep collect

install: $(STAMP)

# The stamp is rebuilt only when the dependency spec changes (idempotent, fast when current).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, lightning, torchmetrics, torch_fidelity, hydra; \
	  print('venv ok: torch', torch.__version__, '| torchvision', torchvision.__version__, '| lightning', lightning.__version__)"
	touch $(STAMP)

run: install
	$(BIN)/python run.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check diffusion_lab tests run.py sweeps benchmarks

format: install
	$(BIN)/ruff format diffusion_lab tests run.py sweeps benchmarks

# localhost only (reach it from elsewhere through `ssh -L 6006:localhost:6006`); TB_HOST=0.0.0.0 to expose it
tensorboard: install
	$(BIN)/tensorboard --logdir $(LOGDIR) --host $(TB_HOST) --port $(TB_PORT)

# diffusers is installed only here (the bench extra), never by `make install`.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache

# Ablation sweeps: make sweep SWEEP=parametrization EXP=states [LAUNCHER=local_jobs] [ARGS="..."]
SWEEP   ?= parametrization
EXP     ?= states
LAUNCHER ?= basic
# The collector runs even when some jobs failed (it marks them); the exit status is the sweep's.
sweep: install
	status=0; $(BIN)/python run.py -m sweep=$(SWEEP) experiment=$(EXP) hydra/launcher=$(LAUNCHER) $(ARGS) \
	  || status=$$?; $(BIN)/python -m diffusion_lab.sweeps collect multirun/$(EXP)/sweep_$(SWEEP); exit $$status

# Aggregate any multirun dir: make collect DIR=multirun/states/sweep_parametrization [METRIC=nll]
collect: install
	$(BIN)/python -m diffusion_lab.sweeps collect $(DIR) $(if $(METRIC),--metric $(METRIC),)
