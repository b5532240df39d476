# lq-edu: two commands to start (see README.md), a few more for instructors.
#   make lab     open the course in JupyterLab (creates .venv on first run)
#   make test    run the whole test suite, notebooks included
#   make course PROFILE=ci|laptop|gpu   run every solution notebook headless, print a table
#   make notebooks   regenerate the student copies in notebooks/ from solutions/
#   make outputs     refresh the committed outputs of solutions/ (ci profile)
#   make model       retrain the course model (about 40 minutes on 2 cores)
#   make lint        ruff

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp changes whenever the install inputs do, so `make` reinstalls then.
STAMP := $(VENV)/.installed
PROFILE ?= laptop
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install lab test course notebooks outputs model lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[notebook,test]'
	@touch $(STAMP)

# Jupyter refuses to run as root unless told (containers, WSL as root); ordinary users get no flag.
ROOT_FLAG := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root,)

lab: install
	$(BIN)/jupyter lab notebooks/ $(ROOT_FLAG)

test: install
	$(BIN)/python -m pytest

course: install
	$(BIN)/python -m lq_edu.notebooks course --profile $(PROFILE)

notebooks: install
	$(BIN)/python -m lq_edu.notebooks sync

outputs: install
	$(BIN)/python -m lq_edu.notebooks execute --profile ci solutions/*.ipynb
	$(BIN)/python -m lq_edu.notebooks sync

model: install
	$(BIN)/python -m lq_edu.pretrain

lint: install
	$(BIN)/ruff check lq_edu tests benchmarks

clean:
	rm -rf build .pytest_cache
