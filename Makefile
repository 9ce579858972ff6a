# Set-up and the two first commands on a fresh clone (needs python3 with venv):
#   make demo   the whole path on the built-in dataset, into WORKDIR (default /tmp/ssast_demo)
#   make test   the test suite, as CI runs it
# Both create the virtual environment VENV (default .venv) from requirements.txt first,
# and again whenever requirements.txt changes.
VENV ?= .venv
WORKDIR ?= /tmp/ssast_demo

.PHONY: demo test

$(VENV)/installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/installed
	$(VENV)/bin/python main.py --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/installed
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m pytest -q -n 2 --dist=loadfile tests
