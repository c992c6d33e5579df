# segbatch: `make demo` and `make test` are all a fresh machine needs (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output
DEMO_MODEL ?= deeplabv3_mobilenet_v3_large
PYTEST_ARGS ?=

.PHONY: venv demo test test-gpu bench bench-data clean

venv: $(STAMP)

# Re-install when the dependency list changes; the editable install picks up code changes by itself.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m segbatch.demo --output $(DEMO_OUT) --model $(DEMO_MODEL)

# CI and developers run the same thing. CUDA tests are deselected: they run on a GPU machine (make test-gpu).
test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

bench-data: $(STAMP)
	$(PY) benchmarks/bench_data.py bench-data/jpeg640 --count 128

bench: bench-data
	$(PY) -m segbatch bench bench-data/jpeg640 --model deeplabv3_mobilenet_v3_large --weights random --batch-size 4 --json bench-data/result.json

clean:
	rm -rf $(DEMO_OUT) bench-data .pytest_cache
