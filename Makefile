# make install: a .venv with torch (CPU wheel unless one is installed already) and lmtune.
# make test / make check / make demo / make bench / make docs: see README.md.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# mkdocs-material prints a banner about MkDocs 2 on every build; the build itself is what matters
export NO_MKDOCS_2_WARNING = 1

.PHONY: install test check format lint typecheck docs docs-reference docs-display docs-plots demo bench bench-compile bench-packing bench-data bench-gpu bench-memory bench-dpo torture clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull GBs of CUDA packages.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(BIN)/pytest -q

format: install
	$(BIN)/ruff format lmtune tests demo bench docs

lint: install
	$(BIN)/ruff check lmtune tests demo bench docs

typecheck: install
	$(BIN)/mypy lmtune

check: install
	$(BIN)/ruff format --check lmtune tests demo bench docs
	$(BIN)/ruff check lmtune tests demo bench docs
	$(BIN)/mypy lmtune
	$(BIN)/mkdocs build --strict --quiet --site-dir site
	$(BIN)/pytest -q

# the documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or a page missing from the nav fails
docs: install
	$(BIN)/mkdocs build --strict --site-dir site

# docs/reference.md, the command reference, generated from the Typer app (tests/test_docs.py fails when it is stale)
docs-reference: install
	$(BIN)/typer lmtune.cli utils docs --name lmtune --output docs/reference.md

# docs/img/display.svg: the live display of a real (tiny, offline) fine-tune, captured on a pseudo-terminal
docs-display: install
	$(PY) docs/capture_display.py

# docs/img/bench-*.png: the benchmark figures of docs/benchmarks.md as bar charts (a test checks they match the page)
docs-plots: install
	$(PY) docs/plot_benchmarks.py

demo: install
	bash demo/run.sh

# lmtune against the Hugging Face Trainer and a bare loop; needs ../shared/data. About 8 minutes on 2 cores.
bench: install
	$(PY) bench/run.py

# eager against --compile on make bench's job (needs its base model): about 10 minutes on 2 cores
bench-compile: install
	$(PY) bench/compile.py

# chat data packed into rows against one conversation per row, padded; needs ../shared/data. About 4 minutes.
bench-packing: install
	$(PY) bench/packing.py

# preparing 250 MB and 1 GB corpora (built from ../shared/data under bench/out/data), lmtune against datasets.map:
# seconds, tokens/s, peak RSS. Not part of `make bench`: about 40 minutes on 2 cores and 10 GB of disk.
bench-data: install
	$(PY) bench/data.py

# on one CUDA GPU: lmtune bf16, each speed lever alone (dropout 0, --compile), the Trainer, a training step's profile
# before and after, the loss alone; needs ../shared/data. About 7 minutes on an H100 (--budget caps it at 450 s).
bench-gpu: install
	$(PY) bench/gpu.py

# peak memory of full fine-tuning, + checkpointing, LoRA, QLoRA and 8-bit AdamW on a GPT-2-small shape (124M), each
# with its dry run's figure, then full vs + checkpointing at batch 16 (activations dominate); on CPU (peak RSS)
# or on a CUDA GPU when there is one. About 30 minutes on 2 busy CPU cores.
bench-memory: install
	$(PY) bench/memory.py

# DPO against TRL's DPOTrainer at equal settings (TRL in its own venv under bench/out/, made on first use:
# never a dependency of lmtune): tokens/s and held-out reward accuracy. A few minutes on 2 cores.
bench-dpo: install
	$(PY) bench/dpo.py

# kill -9 a run at 10 random steps, resume each, and count the ones that end bit-identical. About 2 minutes.
torture: install
	$(PY) tests/torture.py --points 10

clean:
	rm -rf $(VENV) demo/out bench/out site .pytest_cache .mypy_cache .ruff_cache
