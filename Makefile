# The two commands of README.md. Each sets up .venv on first use (or when pyproject.toml
# changes), so a fresh clone needs nothing but python3 (>= 3.11) and make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tml-installed
# torch is only used for DataLoader workers and PyTorch interop: always the CPU build
# (never a multi-GB CUDA wheel). The pinned CPU wheel comes from the local wheel cache
# or PyPI's mirrors when present, else from the PyTorch CPU index.
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: run test setup bench clean-venv

run: $(STAMP)          ## main job: pretrain `tiny` on the embedded corpus (built first when missing), then its alignment summary
	$(VENV)/bin/tml train
	$(VENV)/bin/tml divergence divergence.checkpoint=runs/tiny divergence.out=runs/tiny/divergence divergence.sessions=8

test: $(STAMP)         ## the test suite (a module's tests on one worker: its compiled module fixtures and 8-device subprocesses are built once)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

bench: $(STAMP)        ## data, kernel, model, training and sampler benchmarks (tables + JSON in bench_results/)
	$(VENV)/bin/tml data bench
	$(PY) -m tml.kernels.bench
	$(PY) -m tml.model.bench
	$(PY) -m tml.train.bench
	$(PY) -m tml.sampler.bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tml needs Python >= 3.11")'
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null \
	  || $(PY) -m pip install "$(TORCH_CPU)" \
	  || $(PY) -m pip install "$(subst +cpu,,$(TORCH_CPU))" --index-url $(TORCH_CPU_INDEX)
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
