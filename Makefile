# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Every install goes through the constraints file: it pins torch to the CPU wheel.
PIP_INSTALL := $(PIP) install --quiet -c constraints.txt

.PHONY: demo test fuzz bench venv browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) "torch==2.13.0"
	$(PIP_INSTALL) -e ".[test,dev,samples,html,pt2e]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qconvdiag explain samples/forum_conv.pt

# The HTML report's browser test (tests/render/test_html_browser.py) loads pages in Chromium; it
# never skips, so the test target installs it where it is missing (as root, like CI).
browser:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y chromium)

test: $(STAMP) browser
	$(VENV)/bin/ruff check qconvdiag tests benchmarks samples
	$(VENV)/bin/mypy qconvdiag
	$(PY) -m pytest

# The long fuzz profile: 2,500 random case files through `qconvdiag explain`.
fuzz: $(STAMP)
	QCONVDIAG_HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/test_fuzz.py

bench: $(STAMP)
	$(PY) benchmarks/bench_startup.py
	$(PY) benchmarks/bench_layer.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info
