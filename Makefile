# Two commands do everything on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-slow lint gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m downstream.demo --out demo

# Two pytest workers (pytest-xdist), one thread each: the suite is full of process start-ups, gloo rendezvous and
# subprocesses that leave a core idle; measured 8:56 -> 7:05 on the 2-core machine.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

# One JSON object from one GPU in < 8 minutes (bench/gpu_check.py; CPU without CUDA: its quick smoke sizes).
# Extra flags: make gpu-check GPU_CHECK_ARGS="--out gpu-check"
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf demo runs .pytest_cache
