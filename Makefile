# qcowrs developer commands. `make help` lists them.
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_PACKAGES := "maturin>=1.9.4,<2" pytest hypothesis pytest-timeout ruff mypy tqdm

.PHONY: help setup dev test test-rust test-python lint fmt demo bench fuzz clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed:
	@command -v qemu-img >/dev/null || { echo "qemu-img missing: installing qemu-utils"; \
	  (apt-get update -qq && apt-get install -y -qq qemu-utils) >/dev/null; }
	@# The FUSE export's tests: fusermount3 (fuse3), mkfs.ext4/e2fsck/debugfs (e2fsprogs).
	@{ command -v fusermount3 && command -v mkfs.ext4 && command -v e2fsck && command -v debugfs; } \
	  >/dev/null || { echo "fuse3/e2fsprogs missing: installing"; \
	  (apt-get update -qq && apt-get install -y -qq fuse3 e2fsprogs) >/dev/null; }
	@command -v nbdinfo >/dev/null || { echo "nbdinfo missing: installing libnbd-bin"; \
	  (apt-get update -qq && apt-get install -y -qq libnbd-bin) >/dev/null || true; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_PACKAGES)
	touch $@

setup: $(VENV)/.installed ## create .venv with the build and test tools (and qemu-utils, fuse3, e2fsprogs if missing)

dev: setup ## build the Rust extension (release) and install the package into .venv
	rm -f python/qcowrs/*.so
	$(VENV)/bin/maturin develop --release --quiet
	@# Bytecode compiled now, as pip does for an installed wheel: the editable install runs
	@# from python/, and with PYTHONDONTWRITEBYTECODE every command-line call would compile it.
	PYTHONDONTWRITEBYTECODE= $(PY) -m compileall -q python/qcowrs

test-rust: ## cargo test (pure Rust core, no Python)
	cargo test --quiet

test-python: dev ## pytest against QEMU as the oracle
	$(PY) -m pytest -q

test: test-rust test-python ## everything: set up, build, cargo test, pytest

lint: dev ## clippy (core and bindings), ruff, mypy --strict, and the stubs against the module
	cargo clippy --all-targets -- -D warnings
	cargo clippy --features python -- -D warnings
	$(VENV)/bin/ruff check python tests bench examples
	$(PY) -m mypy --strict python/qcowrs
	$(PY) -m mypy.stubtest qcowrs._qcowrs

fmt: setup ## format Rust and Python
	cargo fmt
	$(VENV)/bin/ruff format python tests bench examples

demo: dev ## build, make a sample image with qemu-img, read it back through qcowrs
	$(PY) examples/demo.py

bench: dev ## read benchmark: qcowrs vs a raw file vs qemu-img (1 GiB)
	$(PY) bench/bench_read.py

FUZZ_SECONDS ?= 60
fuzz: ## cargo-fuzz (nightly; installed if missing): each target for FUZZ_SECONDS (60) on one core
	fuzz/run.sh $(FUZZ_SECONDS)

clean: ## remove build products and the venv
	cargo clean
	rm -rf $(VENV) python/qcowrs/*.so
