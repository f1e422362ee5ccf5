# megatron-mimo: `make train` runs the main job, `make test` runs the test suite.
# Both create .venv (Python >= 3.12) on first use; later calls reuse it (stamp file). The install
# goes through uv (installed from PyPI into the venv: unpacks torch in seconds, pip takes
# minutes; --compile-bytecode as pip does, or the first imports compile megatron-core and print its
# SyntaxWarnings); where uv cannot install (an offline mirror only pip is configured for), pip.

VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
NPROC     ?= 4
CONFIG    ?= digits_cpu
# tiny_cpu_av reads digit images paired with DTMF tones (prepared with --audio)
DATA      ?= $(if $(filter tiny_cpu_av,$(CONFIG)),data/digits-av,data/digits)
ARGS      ?=
PYTEST_ARGS ?=
# make test runs two pytest workers (a spawned world leaves a core idle while it starts and
# waits; unit tests use one core): each test module runs on one worker (tests/conftest.py).
# TEST_WORKERS=0: one process, as plain pytest.
TEST_WORKERS ?= 2

.PHONY: install train test test-fast lint clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml scripts/find_python.sh
	@set -e; \
	if [ ! -x $(PY) ]; then \
	  PYBIN=$$(scripts/find_python.sh); \
	  echo "creating $(VENV) with $$PYBIN"; \
	  "$$PYBIN" -m venv $(VENV); \
	fi; \
	echo "installing megatron-mimo and its test deps into $(VENV) (first time: a minute or more)"; \
	if $(PY) -m pip install --disable-pip-version-check -q uv > $(VENV)/pip.log 2>&1 \
	   && $(VENV)/bin/uv pip install --compile-bytecode --python $(PY) -e '.[test,dev]' >> $(VENV)/pip.log 2>&1; then :; \
	else \
	  echo "uv could not install (see $(VENV)/pip.log); installing with pip"; \
	  $(PY) -m pip install --disable-pip-version-check -e '.[test,dev]' >> $(VENV)/pip.log 2>&1 \
	    || { tail -40 $(VENV)/pip.log; echo "pip install failed; full log: $(VENV)/pip.log"; exit 1; }; \
	fi; \
	$(PY) -c "import torch, megatron.core, megatron_mimo" >> $(VENV)/pip.log 2>&1 \
	  || { tail -20 $(VENV)/pip.log; echo "import check failed; full log: $(VENV)/pip.log"; exit 1; }; \
	touch $(STAMP)

# The digits dataset is prepared once (a few seconds, no download) and reused afterwards.
$(DATA)/.nv-meta/dataset.yaml: | $(STAMP)
	$(VENV)/bin/megatron-mimo data prepare-digits $(DATA) $(if $(filter %-av,$(DATA)),--audio)

# CONFIG=llava_digits_cpu fine-tunes an imported Hugging Face LLaVA: a tiny random one is written
# and imported once (no download), as a downloaded model would be.
TINY_LLAVA := runs/tiny-llava
$(TINY_LLAVA)/ckpt/latest_checkpointed_iteration.txt: | $(STAMP)
	$(PY) examples/tiny_llava.py $(TINY_LLAVA)/hf > /dev/null
	$(VENV)/bin/megatron-mimo convert import-hf $(TINY_LLAVA)/hf $(TINY_LLAVA)/ckpt

train: $(STAMP) $(DATA)/.nv-meta/dataset.yaml \
       $(if $(filter llava_digits_cpu,$(CONFIG)),$(TINY_LLAVA)/ckpt/latest_checkpointed_iteration.txt)
	@OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
	  examples/pretrain_hetero_mimo.py --config $(CONFIG) --data-path $(DATA) $(ARGS)

test: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP)
	TORCHDYNAMO_DISABLE=1 $(PY) -m pytest -q -m "not dist and not slow" $(PYTEST_ARGS)

# One line per check; on a machine without a GPU every check prints SKIP and the exit code is 0.
# Runs in the existing venv (offline GPU machines: README, "Checking a GPU machine").
gpu-check: $(STAMP)
	@TORCHDYNAMO_DISABLE=1 $(PY) -m megatron_mimo.gpu_check $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_mimo tests examples bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
