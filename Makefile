# Two commands: `make serve` and `make test`. Both set up .venv the first time.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed
# llama.cpp built without its llamafile matrix kernels: batched, chunked and one-token
# evaluation then give bit-identical logits, and speculative output equals the target's own
# (docs/how-it-works.md, "Exactness"). DOVETAIL_KERNELS=fast keeps them: faster F16 prompts,
# output equal only up to rounding. --no-cache-dir: a wheel built before with other flags
# is not reused.
ifneq ($(DOVETAIL_KERNELS),fast)
export CMAKE_ARGS := $(CMAKE_ARGS) -DGGML_LLAMAFILE=OFF
endif

.PHONY: setup serve test lint browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --no-cache-dir -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/dovetail serve $(ARGS)

test: $(STAMP) browser
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The chat page's test drives Debian's chromium (through Playwright; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
		|| echo "chromium is missing (apt-get install chromium): tests/test_chat_page.py will fail"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
