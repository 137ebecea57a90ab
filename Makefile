# The two set-up commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STORE  ?= nsd-store
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test install fashion-mnist bench clean

$(BIN)/nsd: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	# Teams and scale: PostgreSQL catalogs and s3:// data paths (the tests use both).
	$(BIN)/pip install --disable-pip-version-check -q -e '.[scale]'
	touch $@

install: $(BIN)/nsd

test: $(BIN)/nsd
	$(BIN)/python -m pytest -q

# Teams and scale: the tests start a real S3-compatible server (moto) on loopback, from a
# venv of its own (its Flask/Werkzeug pins stay out of .venv). PostgreSQL: see .ci/run.
MOTO := .ci/moto-venv/bin/moto_server
test: $(MOTO)
$(MOTO):
	test -x .ci/moto-venv/bin/python || $(PYTHON) -m venv .ci/moto-venv
	.ci/moto-venv/bin/pip install --disable-pip-version-check -q 'moto[server]==5.2.5'
	touch $@

# Fashion-MNIST from Debian's package when we may install it; `nsd ingest fashion-mnist`
# falls back to the Hugging Face hub otherwise.
fashion-mnist:
	@test -d $(FMNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "dataset-fashion-mnist not installed; nsd will try the Hugging Face hub"; }

demo: $(BIN)/nsd fashion-mnist
	bash bench/demo.sh $(STORE)

clean:
	rm -rf $(STORE) .pytest_cache
