# Task runner. `make setup main` runs the main job on the embedded default; `make setup test`
# runs the tests (what CI runs). PYTHON may point at a conda/venv interpreter.
PYTHON ?= python
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DEB := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser main study verify smoke-main test test-fast bench clean-outputs human-pairs rate human-analysis

setup:
	@# Keep an existing torch (e.g. a CUDA build); install the pinned CPU-machine build otherwise.
	$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PYTHON) -m pip install $(TORCH_PIN)
	$(PYTHON) -m pip install -e ".[dev]"
	@$(MAKE) --no-print-directory data browser

data:
	@# Fashion-MNIST: Debian package when root on Debian; torchvision downloads it elsewhere at first use.
	@if [ -d $(FMNIST_DEB) ]; then echo "Fashion-MNIST: $(FMNIST_DEB)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)); \
	else echo "Fashion-MNIST: not installed system-wide; torchvision will download it on first use"; fi

browser:
	@# Debian's chromium + chromedriver: the rating app's browser test (tests/test_human_browser.py) drives them.
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "browser: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y chromium chromium-driver || (apt-get update && apt-get install -y chromium chromium-driver)); \
	else echo "browser: chromium/chromedriver not installed; the browser test will be skipped"; fi

main:
	@# The demo: both experiments at miniature sizes into outputs/embedded/ (never committed); its report,
	@# outputs/embedded/report/report.md, ends with this run's numbers beside the committed reference's
	@# (outputs/reference/demo). Resumable: run it again and it goes on from the last finished stage.
	$(PYTHON) -m fcr.pipeline run --setting embedded

verify:
	@# The committed results (outputs/study, outputs/pilot, outputs/reference/demo): markers, their files,
	@# fingerprints, no machine paths. One line per problem; exit status 2 when any.
	$(PYTHON) -m fcr.pipeline verify

smoke-main:
	@# The main job's plumbing at CI sizes (params/smoke_pipeline.yaml) into an empty folder, then again:
	@# the second run must find every stage complete (results are code-path checks, never results).
	@root=$${SMOKE_ROOT:-$$(mktemp -d -t fcr-smoke-XXXXXX)}; set -e; \
	$(PYTHON) -m fcr.pipeline run -f params/smoke_pipeline.yaml --root $$root; \
	$(PYTHON) -m fcr.pipeline run -f params/smoke_pipeline.yaml --root $$root > $$root/again.log 2>&1 \
		|| { cat $$root/again.log; exit 1; }; cat $$root/again.log; \
	if grep -E '^   (ran|not complete)' $$root/again.log | grep -v -- '-> .*report$$'; then \
		echo "smoke-main: the second run redid a finished stage"; exit 1; fi; \
	echo "smoke-main: every stage ran, and the second run skipped every finished one ($$root)"

test:
	@# Notebooks run under nbval on copies with params/smoke.yaml injected (nbval has no parameter option).
	$(PYTHON) -m fcr.notebooks prepare -f params/fashion_mnist.yaml -f params/smoke.yaml --out build/notebooks
	$(PYTHON) -m pytest -q tests build/notebooks --nbval-lax

test-fast:
	@# The unit tier (a few minutes on 2 cores): no notebooks, pipeline runs, SD end to end or browser.
	$(PYTHON) -m pytest -q tests -m "not slow and not sd_e2e and not browser and not notebook"

bench:
	$(PYTHON) benchmarks/bench_core.py

# Human A/B preference study (notebook 07): pair set from the committed study sweep, the lab rating app,
# the analysis of whatever ratings the database holds (n/a until people have rated).
HUMAN_PARAMS ?= params/human_embedded.yaml

human-pairs:
	$(PYTHON) -m fcr.human pairs -f $(HUMAN_PARAMS)

rate: human-pairs
	$(PYTHON) -m fcr.human serve -f $(HUMAN_PARAMS)

human-analysis: human-pairs
	$(PYTHON) -m papermill notebooks/07_human_preference.ipynb outputs/human/07_human_preference.ipynb -f $(HUMAN_PARAMS)
