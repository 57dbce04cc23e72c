# Two entry points for a newcomer; both set everything up first (see scripts/setup.sh).
.PHONY: setup demo test test-slow

# GUI tests run on a virtual display when there is no screen.
PYTEST = $(if $(or $(DISPLAY),$(shell command -v xvfb-run >/dev/null || echo none)),,xvfb-run -a -s "-screen 0 1600x1200x24") .venv/bin/python -m pytest

setup:
	@bash scripts/setup.sh

## Open napari with the sample HER2ST section, the bundled model's predictions and the ground
## truth (headless machines: runs on a virtual display and saves hifusion-demo.png).
demo: setup
	.venv/bin/hifusion demo

## Run the test suite (a few minutes; the slow script, benchmark and protocol tests are left out).
test: setup
	$(PYTEST)

## The slow tests only (scripts, benchmarks, whole protocols; CI runs them after `make test`).
test-slow: setup
	$(PYTEST) -m slow
