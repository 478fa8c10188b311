# The two commands a newcomer runs: `make demo` and `make test`. Both set up everything
# they need: the virtual environment, torch==2.13.0 (CPU) first, the project with its test
# extras, and Debian's Fashion-MNIST package when apt is available.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.edgesplit-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
# Extra packages for tests that need them (network namespaces, packet loss, a real Prometheus).
APT_TEST_PACKAGES := dataset-fashion-mnist iproute2 nftables prometheus
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)

.PHONY: demo test test-fast setup data protos lint bench-quick clean

demo: setup data
	$(BIN)/edgesplit demo

test: setup data
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/pytest -q -x -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first, the CPU build: a bare 'torch' requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# Debian's dataset-fashion-mnist (and the test-bed tools) when apt is available; without apt
# the demo still runs on the shipped sample, and the data loader says how to get the data.
data:
	@if [ -f $(FMNIST) ] && command -v prometheus >/dev/null && command -v nft >/dev/null; then :; \
	elif command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
		echo "installing Debian packages: $(APT_TEST_PACKAGES)"; \
		$(SUDO) apt-get install -y -q $(APT_TEST_PACKAGES) >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(APT_TEST_PACKAGES) >/dev/null; } || \
		echo "warning: could not install $(APT_TEST_PACKAGES); set EDGESPLIT_DATA to a folder with the Fashion-MNIST files"; \
	else \
		echo "note: apt-get not available; set EDGESPLIT_DATA to a folder with the Fashion-MNIST IDX files"; \
	fi

protos: setup
	$(BIN)/python -m edgesplit.protos.generate

lint: setup
	$(BIN)/ruff check .

bench-quick: setup data
	$(BIN)/edgesplit bench accuracy --quick --json results/accuracy.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .ruff_cache
