# The two commands a newcomer needs: `make run` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-unit check lint types docs bench lock clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing python3-venv (Debian's python3 ships without ensurepip)"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else \
	    echo "python3 cannot create a venv: run 'sudo apt-get install python3-venv'" >&2; exit 1; \
	  fi; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

## run: start the default stack in the foreground (Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/lbstack up $(ARGS)

## test: the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-unit: the tests that run no real process (a fast loop, under a minute)
test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app tests loadtests deploy
	$(BIN)/ruff format --check app tests loadtests deploy

types: $(STAMP)
	$(BIN)/mypy

## docs: build the documentation site into site/ (broken links fail the build)
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

## check: lint, types, docs and tests, as before every commit
check: lint types docs test

## bench: lbstack against nginx in the same topology (needs wrk and nginx)
bench: $(STAMP)
	$(BIN)/python -m loadtests.bench $(ARGS)

## lock: pin the newest versions pyproject.toml allows into constraints.txt
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info site
