# Two entry points, each doing its own set-up on a fresh machine:
#   make repro   – create/reuse .venv, install the project, run the whole DVC pipeline
#   make test    – create/reuse .venv, install the project with test extras, run the tests
#   make docs    – regenerate the docs' figures and parameter reference from committed files
#   make check-params – check params.yaml as the stages do, before DVC parses it (repro runs it)
#   make coarse / make staged – the coarse -> fine and the staged FCN-32s -> 16s -> 8s pipelines
#   make hooks   – a git pre-commit hook that refuses a params.yaml the stages would refuse
#   make gpu-check – prove the CUDA paths on a GPU (both profiles, ≤ 2 x 4 min), or their dry
#                  run without one; table on stdout, every figure in gpu_check.json
#   make gpu-wheels – the wheels a lent GPU machine lacks, into .whl/ (docs/gpu-check.md)
# VENV=/path reuses a virtual environment elsewhere.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-warn-script-location
# Tests also run the slow end-to-end ones; PYTEST_ARGS="-m 'not slow'" skips them.
PYTEST_ARGS ?=
# One pytest worker per core (pytest-xdist), each test file on one worker, so that a module's
# shared fixture (the tiny pipeline run, a trained checkpoint) is made once; PYTEST_WORKERS=0
# runs in this process.
PYTEST_WORKERS ?= auto

.PHONY: install repro test docs check-params hooks gpu-check gpu-wheels clean browser coarse staged

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import fcn, torch, torchvision, dvc, dvclive, isal, onnx, onnxscript, onnxruntime, av, cityscapesscripts"
	touch $@

install: $(VENV)/.installed

# DVC parses params.yaml before any project code runs, with a loader that expands YAML aliases:
# the project's check (size, no aliases, every field) goes first.
check-params: install
	$(PY) -m fcn.params params.yaml

hooks:
	git config core.hooksPath .githooks

repro: install check-params
	@test -d .git || (echo "dvc needs a git repository: run 'git init && git add -A && git commit -m init' first" && exit 1)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

# The recipe pipelines (docs/training.md): coarse -> fine (recipes/coarse_to_fine.yaml) and the
# staged FCN-32s -> 16s -> 8s (recipes/staged.yaml). Each is put where DVC finds it,
# pipelines/<name>/dvc.yaml (kept if already there: commit your copy), then reproduced with
# what it needs upstream.
RECIPE_coarse := recipes/coarse_to_fine.yaml
RECIPE_staged := recipes/staged.yaml

coarse staged: install check-params
	@test -d .git || (echo "dvc needs a git repository: run 'git init && git add -A && git commit -m init' first" && exit 1)
	@mkdir -p pipelines/$@
	@test -f pipelines/$@/dvc.yaml || cp $(RECIPE_$@) pipelines/$@/dvc.yaml
	@cmp -s $(RECIPE_$@) pipelines/$@/dvc.yaml || echo "note: pipelines/$@/dvc.yaml differs from $(RECIPE_$@) (kept)"
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro pipelines/$@/dvc.yaml

# The offline-plots test renders `dvc plots show` in headless Chromium: install it when missing
# and we may (root + apt-get); never fail here – without it that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "note: could not install chromium; the offline-plots browser test will skip"

test: install browser
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

docs: install
	$(PY) docs/generate.py

gpu-check: install
	$(PY) -m fcn.gpucheck --profile all --out gpu_check.json

gpu-wheels: install
	$(PY) -m fcn.gpucheck.wheels --dest .whl

clean:
	rm -rf dvc_plots .pytest_cache
