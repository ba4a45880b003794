# Set-up and checks. Each target makes its own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo benchmark speed lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) scripts/demo.py --out demo_output

speed: $(VENV)/.installed
	$(PY) benchmarks/speed.py

benchmark: $(VENV)/.installed
	$(PY) -m pip install -q '.[benchmark]'
	$(PY) benchmarks/lpba40.py

clean:
	rm -rf $(VENV) demo_output benchmark_output
