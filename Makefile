# cxr-covid-nbdev: `make dashboard` serves the dashboard, `make test` runs every check CI runs.
SHELL := /bin/bash
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PORT ?= 8866
SHARED ?= $(abspath ../shared)

.PHONY: install install-dev browser dashboard test check-drift nbtest pytest docs docs-readme docs-screenshot bench help

help:
	@echo "make dashboard  install and serve the clinician dashboard on http://127.0.0.1:$(PORT)"
	@echo "make test       install everything and run the checks CI runs"
	@echo "make docs       build the documentation site with Jupyter Book into _build/html"
	@echo "make docs-screenshot  the dashboard chapter's screenshot (nbs/figures/dashboard.png)"
	@echo "make bench      run the benchmarks (not tests)"

install:
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q -e ".[dev]"

browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

dashboard: install
	cxr-covid dashboard --port $(PORT)

# The notebooks are the source: cleaning and exporting them must change nothing.
check-drift:
	@snap() { find nbs cxr_covid_nbdev -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' | sort | xargs md5sum | md5sum; }; \
	before=$$(snap); nbdev-clean && nbdev-export; after=$$(snap); \
	if [ "$$before" != "$$after" ]; then echo "nbdev-clean/nbdev-export changed files: commit clean, exported notebooks"; git status --short -- nbs cxr_covid_nbdev; exit 1; fi

# nbdev-test runs copies of the notebooks and keeps their outputs in _build/nbtest: the docs test builds the
# site from them instead of running every notebook a second time (`docs.stage(reuse=...)`).
# Their temporary folders go to _build/nbtmp, removed when the run ends, passed or failed: /tmp keeps nothing of them.
# Afterwards /tmp may hold no folder it did not hold before (one made by another program meanwhile counts too).
nbtest:
	rm -rf _build/nbtest _build/nbtmp && mkdir -p _build/nbtest _build/nbtmp && cp nbs/*.ipynb _build/nbtest/
	ls -A $${TMPDIR:-/tmp} | sort > _build/nbtest.tmp-before
	CXR_SHARED=$(SHARED) CXR_DOCS_ROOT=$(CURDIR) PYTHONHASHSEED=0 MPLBACKEND=module://matplotlib_inline.backend_inline TMPDIR=$(CURDIR)/_build/nbtmp \
	  nbdev-test _build/nbtest --n-workers 2 --timing --save; rc=$$?; rm -rf _build/nbtmp; \
	left=$$(ls -A $${TMPDIR:-/tmp} | sort | comm -13 _build/nbtest.tmp-before - | while read f; do [ -d "$${TMPDIR:-/tmp}/$$f" ] && echo "$$f"; done); \
	if [ -n "$$left" ]; then echo "the notebooks left folders in $${TMPDIR:-/tmp}: $$left"; exit 1; fi; exit $$rc

# The tests' temporary folders (pytest's tmp_path and every tempfile the library makes) go to one folder,
# removed when the run ends, passed or failed; Ray keeps its session folders where it always does.
pytest:
	tmp=$$(mktemp -d -t cxr-covid-pytest.XXXXXX); \
	CXR_SHARED=$(SHARED) TMPDIR=$$tmp RAY_TMPDIR=$${RAY_TMPDIR:-/tmp/ray} \
	  $(PYTHON) -m pytest -q -ra --durations=30 -n 2 --dist loadgroup -p no:benchmark --basetemp=$$tmp/basetemp; \
	  rc=$$?; rm -rf $$tmp; exit $$rc

test: install-dev browser check-drift nbtest pytest

# The research compendium (Jupyter Book, warnings are errors) into _build/html; `docs-readme` re-runs
# nbs/index.ipynb against the newest run and rewrites README.md from it.
docs: install-dev
	CXR_SHARED=$(SHARED) $(PYTHON) -m cxr_covid_nbdev.docs build

# The dashboard chapter's picture: the dashboard on the default model after a real upload, into nbs/figures/dashboard.png.
docs-screenshot: install-dev browser
	CXR_SHARED=$(SHARED) $(PYTHON) -m cxr_covid_nbdev.docs screenshot

docs-readme: install-dev
	CXR_SHARED=$(SHARED) $(PYTHON) -m cxr_covid_nbdev.docs readme

bench: install-dev
	CXR_SHARED=$(SHARED) $(PYTHON) benchmarks/bench_prepare.py
	CXR_SHARED=$(SHARED) $(PYTHON) benchmarks/bench_predict.py
	CXR_SHARED=$(SHARED) $(PYTHON) benchmarks/bench_default.py
	CXR_SHARED=$(SHARED) $(PYTHON) benchmarks/bench_train.py
	CXR_SHARED=$(SHARED) $(PYTHON) benchmarks/bench_dashboard.py --pages 10
	CXR_SHARED=$(SHARED) $(PYTHON) benchmarks/bench_batch.py
