# Everything runs inside one .venv, installed in two idempotent steps (a stamp file records each): the runtime
# and synthetic-data packages, which the recipes need, then the dev tools (pytest, ruff, PyTorch for the
# backend tests), which only test, lint and bench need. `make install` does both.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev

# Synthetic demo data, and the real data when DATA=/path is given.
SYNTH_DIR := data/synth
DATA ?=
SEEDS ?=
EPOCHS ?=
ARGS ?=
RECIPES ?= dacon
RECIPE_ARGS := $(if $(SEEDS),--seeds $(SEEDS)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

.PHONY: install install-runtime test test-all lint bench bench-recipes synth-dacon recipe-dacon synth-maic recipe-maic synth-dcase recipe-dcase synth-aicup recipe-aicup clean

install: $(DEV_STAMP)

install-runtime: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[synth]"
	touch $(RUNTIME_STAMP)

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,synth]"
	touch $(DEV_STAMP)

# The default suite (what CI runs): under 15 minutes on 2 CPU cores.
test: install
	$(BIN)/python -m pytest -m "not slow"

# Everything, slow end-to-end runs included.
test-all: install
	$(BIN)/python -m pytest -m "slow or not slow"

lint: install
	$(BIN)/ruff check replicate models tests benchmarks
	$(BIN)/ruff format --check replicate models tests benchmarks

# Features, the input pipeline, 2 members on Ray against one after another, training throughput per backend and
# fused ensembles; writes benchmarks/results/ and the README tables.
bench: install
	$(BIN)/python -m benchmarks.run $(ARGS)

# End-to-end wall time of every quick recipe from fresh synthetic data, and each recipe's README results block
# regenerated from the run it timed (tens of minutes; not part of bench). RECIPES=dacon,maic,dcase,aicup;
# KEEP_RUNS=DIR keeps the run folders (DIR/<recipe>), e.g. to compare scores.json across versions.
bench-recipes: install
	$(BIN)/python -m benchmarks.run --skip-features --skip-pipeline --skip-ray --backends "" --recipes $(RECIPES) \
		--recipe-results $(if $(KEEP_RUNS),--keep-runs $(KEEP_RUNS))

$(SYNTH_DIR)/dacon/train_answer.csv: | install-runtime
	$(BIN)/python -m replicate.synth dacon --out $(SYNTH_DIR)/dacon --n-train 800 --n-test 200 --seed 0 --max-words 2 --voices-per-word 1 --seen-test-voices

synth-dacon: $(SYNTH_DIR)/dacon/train_answer.csv

# Without DATA: the quick profile on synthetic data. With DATA=/path: the full source recipe.
ifeq ($(DATA),)
recipe-dacon: synth-dacon
	$(BIN)/python -m replicate.dacon --data $(SYNTH_DIR)/dacon --profile quick $(RECIPE_ARGS)
else
recipe-dacon: install-runtime
	$(BIN)/python -m replicate.dacon --data $(DATA) $(RECIPE_ARGS)
endif

$(SYNTH_DIR)/maic/test_answer.csv: | install-runtime
	$(BIN)/python -m replicate.synth maic --out $(SYNTH_DIR)/maic --n-train 200 --n-test 80 --seed 0

synth-maic: $(SYNTH_DIR)/maic/test_answer.csv

# Without DATA: the quick profile on synthetic data. With DATA=/path: the full source recipe.
ifeq ($(DATA),)
recipe-maic: synth-maic
	$(BIN)/python -m replicate.maic --data $(SYNTH_DIR)/maic --profile quick $(RECIPE_ARGS)
else
recipe-maic: install-runtime
	$(BIN)/python -m replicate.maic --data $(DATA) $(RECIPE_ARGS)
endif

$(SYNTH_DIR)/aicup/Training_Dataset/training_datalist.csv: | install-runtime
	$(BIN)/python -m replicate.synth aicup --out $(SYNTH_DIR)/aicup --n-train 600 --n-public 150 --n-private 150 --seed 0

synth-aicup: $(SYNTH_DIR)/aicup/Training_Dataset/training_datalist.csv

# Without DATA: the quick profile on synthetic data (multimodal and audio only). With DATA=/path: the source recipe.
ifeq ($(DATA),)
recipe-aicup: synth-aicup
	$(BIN)/python -m replicate.aicup --data $(SYNTH_DIR)/aicup --profile quick $(RECIPE_ARGS)
else
recipe-aicup: install-runtime
	$(BIN)/python -m replicate.aicup --data $(DATA) $(RECIPE_ARGS)
endif

# DCASE 2020 Task 2: all six machine types, 2 development + 1 evaluation ID each, 2-s clips (the quick demo).
$(SYNTH_DIR)/dcase/eval_ground_truth.csv: | install-runtime
	$(BIN)/python -m replicate.synth dcase --out $(SYNTH_DIR)/dcase --dev-ids 2 --eval-ids 1 --train-per-id 40 --test-per-id 10 --seconds 2 --seed 0

synth-dcase: $(SYNTH_DIR)/dcase/eval_ground_truth.csv

# Without DATA: the quick profile on synthetic data. With DATA=/path: the full source recipe.
ifeq ($(DATA),)
recipe-dcase: synth-dcase
	$(BIN)/python -m replicate.dcase --data $(SYNTH_DIR)/dcase --profile quick $(RECIPE_ARGS)
else
recipe-dcase: install-runtime
	$(BIN)/python -m replicate.dcase --data $(DATA) $(RECIPE_ARGS)
endif

clean:
	rm -rf runs .cache $(SYNTH_DIR) .pytest_cache .ruff_cache
