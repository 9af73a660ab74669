# Two commands matter: `make quickstart` and `make test`. Both set up .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# torch/torchvision pins: the versions this project is tested with (override for other platforms,
# e.g. `make test TORCH="torch torchvision"`).
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup quickstart test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/sweeper train configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs mlflow.db mlruns .pytest_cache
