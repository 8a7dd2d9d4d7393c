# Two entry points on a fresh clone: `make verify` (the main job) and `make test` (the whole suite,
# also CI's). `make test-fast` is the quick lane: no kernel runs, no ahead-of-time compiles, no
# benchmark scripts (the pytest markers kernel, aot and slow; see pyproject.toml).
# Each creates .venv on first use. On a machine without an NVIDIA GPU, torch comes from the CPU
# build pinned here (2.13.0); pyproject.toml itself only asks for torch>=2.4.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CPU_TORCH := torch==2.13.0

.PHONY: verify test test-fast check-triton36 clean-venv

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

# The oldest Triton of pyproject's range, in a venv of its own (.venv36): every shipped spec's
# kernels compiled ahead of time for sm_90 at the first config of each autotune space (the config
# the interpreter and ATTNGEN_CONFIGS=first run; the report exits non-zero when one spills), then
# two specs verified under its CPU interpreter (which needs numpy < 2.4). The report: 188 kernels,
# none spilling, 2.6 min with an empty Triton cache on a loaded 2-core CPU machine (2026-11-30);
# the verify about 30 s; plus the venv's first install (torch and
# Triton, a few minutes). Not part of `make test`: CI's budget has no room for a second venv.
VENV36 := .venv36
TRITON36 := triton==3.6.0

$(VENV36)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/pip install --quiet $(CPU_TORCH) $(TRITON36) 'numpy<2.4'
	$(VENV36)/bin/pip install --quiet -e '.[test]' $(TRITON36) 'numpy<2.4'
	@touch $@

check-triton36: $(VENV36)/.installed
	@mkdir -p $(VENV36)/gen
	$(VENV36)/bin/attngen report --arch sm_90 --configs first --dtypes first --out $(VENV36)/gen
	$(VENV36)/bin/attngen verify --out $(VENV36)/gen specs/llama3_gqa.yaml specs/sliding_window.yaml

clean-venv:
	rm -rf $(VENV) $(VENV36)
