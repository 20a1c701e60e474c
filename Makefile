# Fresh machine: `make test` or `make demo` create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo

.PHONY: test demo clean

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q

demo: $(VENV)/installed
	PY=$(PY) DEMO=$(DEMO) sh demo.sh

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache
