# megatron-vr1: two commands do all the set-up.
#   make demo   the main job: GRPO (real SGLang CPU server) vs continued SFT from the committed SFT warm start
#               (bootstraps .venv and .venv-sglang first; ~17 min on 2 CPU cores)
#   make test   the test suite (bootstraps .venv and .venv-sglang first)
# Both are idempotent; a second run skips the installs (a hash of the pins is checked).

PY      := .venv/bin/python
PYTEST  := $(PY) -m pytest
# The whole suite: unit, distributed (torchrun on gloo), integration (real SGLang server, Slurm, end to end).
TESTS   ?= tests

.PHONY: all venv sglang-venv demo warmstart test test-unit test-fast clean help

help:
	@echo "make demo       the CPU demo (main job): GRPO vs continued SFT from the warm start, ~17-19 min"
	@echo "make warmstart  rebuild the SFT warm start in assets/warmstart from scratch (~20-35 min on 2 cores)"
	@echo "make test       the full test suite"
	@echo "make test-unit  fast CPU unit tests only"

venv:
	@bash scripts/bootstrap.sh

sglang-venv:
	@if [ -f scripts/bootstrap_sglang.sh ]; then bash scripts/bootstrap_sglang.sh; fi

demo: venv sglang-venv
	$(PY) -m megatron_vr1.cli demo run

warmstart: venv
	$(PY) -m megatron_vr1.cli demo warmstart

test: venv sglang-venv
	$(PYTEST) $(TESTS) -q -p no:cacheprovider --timeout=900

test-unit: venv
	$(PYTEST) tests/unit -q -p no:cacheprovider

clean:
	rm -rf .venv .venv-sglang runs .pytest_cache
