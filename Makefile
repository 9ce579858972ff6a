# Set-up and the two first commands on a fresh clone (needs python3 with venv):
#   make demo   the whole path on the built-in dataset, into WORKDIR (default /tmp/ssast_demo)
#   make test   the test suite, as CI runs it
# They create their virtual environments first, and again whenever the requirements change:
# VENV (default .venv) from requirements.txt; TEST_VENV (default .venv-test) from it and
# requirements-compile.txt.
VENV ?= .venv
TEST_VENV ?= .venv-test
WORKDIR ?= /tmp/ssast_demo

.PHONY: demo test

$(VENV)/installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

# The compile-only TPU and CUDA backends of `python -m ssast_jax.plan`, in their own folder
# (only the plan and the tests put it on their path).
.compile-backends/installed: $(VENV)/installed requirements-compile.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps --target .compile-backends -r requirements-compile.txt
	touch $@

# The tests' own environment: requirements.txt plus the compile-only TPU and CUDA backends
# of requirements-compile.txt (tests/test_plan.py), kept out of VENV, where they would make
# JAX look for accelerators that are not there.
$(TEST_VENV)/installed: requirements.txt requirements-compile.txt
	python3 -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TEST_VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(TEST_VENV)/bin/python -m pip install --quiet --no-deps -r requirements-compile.txt
	touch $@

demo: $(VENV)/installed
	$(VENV)/bin/python main.py --config=configs/demo.py --workdir=$(WORKDIR)

test: $(TEST_VENV)/installed
	PATH="$(abspath $(TEST_VENV))/bin:$$PATH" python -m pytest -q -n 2 --dist=loadfile tests
