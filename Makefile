# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.fxquant-installed
TORCH   := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-inductor bench setup graphviz clean optable docs fuzz

setup: $(STAMP) graphviz

# torch first (the CPU build pip finds on these machines), then the package with its dev extra.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's graphviz gives the `dot` binary that fxquant.visualize renders with.
# g++: torch.compile / AOTInductor (fxquant.compile(..., backend="inductor")) build C++ kernels.
graphviz:
	@command -v dot >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q graphviz g++; }

demo: setup
	$(VPY) examples/static_ptq_resnet.py

test: setup
	$(VPY) -m pytest -q -n 2 $(PYTEST_ARGS)

# The Inductor compile / AOTInductor package tests (minutes each: not in `make test`).
test-inductor: setup
	FXQUANT_INDUCTOR_TESTS=1 $(VPY) -m pytest -q tests/test_integer_repr.py tests/test_inductor_fusion.py $(PYTEST_ARGS)

# the bench extra adds NNCF (the ov.nncf peer); where it cannot install, that path prints n/a
bench: setup
	$(VPY) -m pip install -q -e '.[bench]' || echo "bench extra (nncf) not installed: ov.nncf will be n/a"
	$(VPY) benchmarks/run.py

# Differential fuzz (tests/fuzz_models.py): FUZZ_N generated models on x86 and qnnpack, each
# converted model against fxquant's own reference graph; progress every 100 models, a summary,
# each failure with its replay command; exit status 1 on any failure. CI runs the first 200.
FUZZ_N  ?= 2000
FUZZ_ARGS ?=
fuzz: setup
	$(VPY) -m tests.fuzz_models --n $(FUZZ_N) --backends x86,qnnpack --seed 0 --shrink $(FUZZ_ARGS)

# The README's supported-op table, regenerated from the backend / fusion / spelling tables.
optable: setup
	$(VPY) -m fxquant.optable --write README.md

# The README's decision picture (docs/decisions*.svg) and the demo's text report (docs/report.txt),
# from examples/report_and_viz.py; its HTML / Markdown reports go to out/docs/.
docs: setup
	$(VPY) examples/report_and_viz.py --out out/docs --docs docs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
