# The README's two commands: `make demo` (install + the default job) and `make test` (install + tests).
# Both create their own virtual environment in .venv; pip resolves torch from the registry.
PYTHON ?= python3
VENV ?= .venv
THREADS ?= 2
BIN := $(VENV)/bin

.PHONY: install demo test test-fast docs lint format bench clean-runs

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $@

install: $(BIN)/.installed

# The default job: VAE stage (trained once, then reused), latent diffusion on digits, evaluation.
# Run again, it continues runs/digits-latent from its last checkpoint (a finished run trains no more steps).
demo: install
	$(BIN)/accelerate launch --config_file accelerate_config.yaml train_scripts/train_unet.py --num_threads $(THREADS) \
		--resume_from_checkpoint latest
	$(BIN)/python -m skipdiff.eval --checkpoint runs/digits-latent --fid --denoise_loss --num_threads $(THREADS)

# The whole suite, the PostgreSQL test included (it starts its own server); `pytest -m extended` adds two
# longer scenarios.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The edit-test loop: everything but the tests marked slow (subprocesses, launches, compile, searches).
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

# The documentation site (mkdocs, material theme, API reference from the docstrings) into site/, in strict
# mode: a broken link, a page left out of the navigation or a docstring naming a missing object fails it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: install
	$(BIN)/ruff check skipdiff train_scripts tests bench eval docs/hooks
	$(BIN)/ruff format --check skipdiff train_scripts tests bench eval docs/hooks

# Rewrite the code to the formatter's layout (what `make lint` checks).
format: install
	$(BIN)/ruff format skipdiff train_scripts tests bench eval docs/hooks
	$(BIN)/ruff check --fix --select I skipdiff train_scripts tests bench eval docs/hooks

bench: install
	$(BIN)/python bench/gate_overhead.py --threads $(THREADS)

clean-runs:
	rm -rf runs
