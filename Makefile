# Two commands: `make demo` and `make test`. Both build .venv from nothing on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where there is no GPU, take torch's CPU build (the local version "+cpu"): pip finds it through
# its configured find-links / extra index (set PIP_EXTRA_INDEX_URL to PyTorch's CPU index elsewhere).
TORCH_VERSION ?= 2.13.0
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
                && echo "torch==$(TORCH_VERSION)" || echo "torch==$(TORCH_VERSION)+cpu")

DEMO_OUT ?= out/demo

.PHONY: demo test lint bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/liveavatar-batch produce \
		--audio examples/lecture.mp3 \
		--image examples/portrait.jpg \
		--prompt "$$(cat examples/prompt.txt)" \
		--engine auto \
		--segment-seconds 10 --max-segment-seconds 15 \
		--out $(DEMO_OUT)

# The UI test (tests/test_ui_browser.py) drives Debian's chromium; Playwright uses it, downloads none.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out .work
