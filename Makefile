# Two commands a new user needs: `make demo` and `make test`. Both set up .venv on first use.
# `make test` is the full suite (what CI runs); `make test-fast` skips the tests marked slow (> ~30 s each).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install data clean bench

# Debian ships Fashion-MNIST as idx.gz files; install them once if they are missing.
data: $(FMNIST_DIR)/train-images-idx3-ubyte.gz
$(FMNIST_DIR)/train-images-idx3-ubyte.gz:
	@if [ "$(FMNIST_DIR)" = "/usr/share/datasets/fashion-mnist" ]; then \
	  echo "Installing Debian's dataset-fashion-mnist (needs root)..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST not found under $(FMNIST_DIR)"; exit 1; fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so that nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The test extra brings pytest, and setuptools for tests/test_wheel.py (it builds the wheel without isolation).
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) data

demo: install
	$(BIN)/feddtl run --config demo --set method=zeroshot --out runs/demo/zeroshot --quiet
	$(BIN)/feddtl run --config demo --out runs/demo/feddtl
	$(BIN)/feddtl report runs/demo/zeroshot runs/demo/feddtl

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/cache_speed.py --demo

clean:
	rm -rf runs .pytest_cache
