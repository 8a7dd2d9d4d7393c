# Two entry points on a fresh clone: `make verify` (the main job) and `make test`.
# Both create .venv on first use. On a machine without an NVIDIA GPU, torch comes from the CPU
# build pinned here (2.13.0); pyproject.toml itself only asks for torch>=2.4.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CPU_TORCH := torch==2.13.0

.PHONY: verify test clean-venv

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

clean-venv:
	rm -rf $(VENV)
