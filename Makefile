# Two entry points on a fresh clone: `make verify` (the main job) and `make test` (the whole suite,
# also CI's). `make test-fast` is the quick lane: no kernel runs, no ahead-of-time compiles, no
# benchmark scripts (the pytest markers kernel, aot and slow; see pyproject.toml).
# Each creates .venv on first use. On a machine without an NVIDIA GPU, torch comes from the CPU
# build pinned here (2.13.0); pyproject.toml itself only asks for torch>=2.4.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CPU_TORCH := torch==2.13.0

.PHONY: verify test test-fast clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet torch; \
	else \
		$(BIN)/pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/pip install --quiet -e '.[test,bench]'
	@touch $@

verify: $(VENV)/.installed
	$(BIN)/attngen verify

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not kernel and not aot and not slow"

clean-venv:
	rm -rf $(VENV)
