# Two entry points for a newcomer; both set everything up first (see scripts/setup.sh).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

## Open napari with the sample HER2ST section, the bundled model's predictions and the ground
## truth (headless machines: runs on a virtual display and saves hifusion-demo.png).
demo: setup
	.venv/bin/hifusion demo

## Run the test suite (GUI tests on a virtual display when there is no screen).
test: setup
	@if [ -n "$${DISPLAY:-}" ] || ! command -v xvfb-run >/dev/null; then \
		.venv/bin/python -m pytest; \
	else \
		xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest; \
	fi
