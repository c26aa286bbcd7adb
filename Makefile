# Two commands: `make run` (local stack) and `make test` (the whole suite).
# Both create .venv with Python 3.11+ and install the project into it first: the pinned versions of
# requirements.txt (what Heroku installs on every dyno), then the project editable with its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bench lock clean

# requirements.txt's last line installs the app itself (non-editable, as on a dyno); here it is editable.
$(VENV)/.installed: setup.cfg setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	grep -vx '\.' requirements.txt > $(VENV)/pins.txt
	$(PY) -m pip install --quiet -r $(VENV)/pins.txt -e '.[test]'
	touch $@

# requirements.txt: every dependency of setup.cfg's install_requires pinned by pip-compile, then the app
# itself (`.`). Run after changing install_requires; LOCK_ARGS=--upgrade moves every pin to the newest allowed.
lock: $(VENV)/.installed
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --output-file=requirements.txt $(LOCK_ARGS) setup.cfg
	printf '%s\n' '# the app itself, after its pinned dependencies (gives dynos the l2u-relay command)' . \
	  >> requirements.txt

run: $(VENV)/.installed
	$(VENV)/bin/l2u-relay run

# pytest exits 5 when it collected no tests: that is a failure here. Test files run in TEST_WORKERS
# parallel processes (pytest-xdist; a file's tests stay in one process, so its servers start once);
# TEST_WORKERS=0 runs everything in this process. Most tests wait on real servers, so 3 on 2 cores.
TEST_WORKERS ?= 3
test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The benchmark (README, Performance): BENCH_ARGS="--profile ci" for the tiny run. Uses wrk when it
# is there, installing it from Debian's packages when run as root, else a pure-Python load generator.
bench: $(VENV)/.installed
	@command -v wrk >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null 2>&1; }; }; } || \
	  echo "wrk is not installed (Debian: apt-get install wrk): using the Python load generator"
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .l2u-relay *.egg-info
