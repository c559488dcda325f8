# Two commands do everything on a fresh machine:
#   make run    - set up .venv and run the whole DAG on the embedded default (tiny model + sample data)
#   make test   - set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
# what this machine has in total (concurrent jobs stay within it)
MEM_MB ?= 20000
GPUS ?= 1
TORCH ?= torch==2.13.0

.PHONY: run test setup lint schema clean-results

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --cores $(CORES) --resources mem_mb=$(MEM_MB) gpu=$(GPUS) --profile profiles/default

test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

lint: setup
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --lint
	PATH=$(abspath $(VENV))/bin:$$PATH snakefmt --check Snakefile workflow/rules
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy

schema: setup
	$(VENV)/bin/llama-pipe schema --write --reference --config-file

clean-results:
	rm -rf results logs .snakemake
