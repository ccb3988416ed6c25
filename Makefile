# The two commands a newcomer runs: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv test test-fast lint demo

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

venv: $(BIN)/activate
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"

test: venv
	$(BIN)/python -m pytest -q -ra tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

demo: venv
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		(echo "Install Debian's dataset-fashion-mnist (needs root) or pass --data-dir" && exit 1)
	$(BIN)/optimum-isoprune demo $(DEMO_ARGS)

# Regenerate benchmarks/results (JSON + PNG) and the tables of BENCHMARKS.md (about 100 min on 2 shared cores).
.PHONY: benchmarks
benchmarks: venv
	cd benchmarks && ../$(BIN)/python budget_accuracy.py
	cd benchmarks && ../$(BIN)/python prune_cost.py --repeats 2 --models vit_b16,convnext_b,vit_l16
	cd benchmarks && ../$(BIN)/python latency.py --rounds1 7 --rounds32 3
	cd benchmarks && ../$(BIN)/python ranking_quality.py --fresh --steps 100 --seeds 0,1,2
	cd benchmarks && ../$(BIN)/python ranking_quality.py --steps 100 --seeds 0,1 --part5 --part5-steps 400
	cd benchmarks && ../$(BIN)/python summarize.py
	cd benchmarks && ../$(BIN)/python teachers.py
	cd benchmarks && ../$(BIN)/python recovery.py --reconstruction none,least_squares,least_squares:search,least_squares:global
	cd benchmarks && ../$(BIN)/python recovery.py --plot
	cd benchmarks && ../$(BIN)/python recovery_cost.py --configs none:shared,least_squares:shared,least_squares:search
	cd benchmarks && ../$(BIN)/python deploy.py && ../$(BIN)/python deploy.py --part tables
	cd benchmarks && ../$(BIN)/python recipe.py
