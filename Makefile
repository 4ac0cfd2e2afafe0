# Two commands for a newcomer:  `make demo` (set up + run the whole pipeline on the tiny world)
#                               `make test` (set up + run the test suite; what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so no later install can swap in another (e.g. CUDA) build;
# on a GPU machine use e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"`
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-fast demo demo-search tiny-world submission image-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	@# a setup before insightface moved to requirements-nodeps.txt left the GUI opencv-python, whose files
	@# overwrote the headless build's cv2/: remove it, then put the headless files back
	if $(PY) -m pip show -q opencv-python 2>/dev/null; then \
		$(PY) -m pip uninstall -y opencv-python && \
		$(PY) -m pip install --force-reinstall --no-deps "opencv-python-headless==$$($(PY) -c \
			'import importlib.metadata as m; print(m.version("opencv-python-headless"))')"; fi
	touch $@

# the tests run torch on one thread each (tests/conftest.py), so each core runs a test of its own (pytest-xdist)
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS)

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow"

tiny-world: setup
	$(PY) tools/tiny_world.py

demo: setup
	$(PY) tools/demo.py

# the demo with a small recipe search (--auto_recipe over three recipes); prints the search report's path
demo-search: setup
	$(PY) tools/demo.py --auto_recipe --workdir demo_search --train_step 15 --validation_steps 5

# the submission image the organizers grade (needs Docker); ARGS="--dry-run" checks the inputs only
submission: setup
	$(PY) tools/make_submission.py $(ARGS)

# the submission image replayed in a clean Debian root (mmdebstrap; needs root), the organizers' flow inside it
# offline: README "Proving the submission image"
image-check: setup
	$(PY) tools/image_check.py --torch "$(TORCH_SPEC)"

clean:
	rm -rf tiny_world demo_run demo_search grade_run build .pytest_cache
