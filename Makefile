# The two set-up commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STORE  ?= nsd-store
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test install system-deps fashion-mnist bench bench-venv clean

$(BIN)/nsd: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	# Teams and scale: PostgreSQL catalogs and s3:// data paths (the tests use both).
	$(BIN)/pip install --disable-pip-version-check -q -e '.[scale]'
	touch $@

install: $(BIN)/nsd

test: $(BIN)/nsd system-deps fashion-mnist
	$(BIN)/python -m pytest -q

# What the tests start besides Python packages: PostgreSQL's binaries (teams: a real catalog
# server on loopback) and Debian's chromium (the report's pages in a real headless browser).
# Installed when missing and we may (root + apt), so `make test` alone passes on a fresh machine.
system-deps:
	@{ ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "PostgreSQL is missing and cannot be installed here: its tests will fail"
	@test -x /usr/bin/chromium || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is missing and cannot be installed here: the report's browser tests will fail"

# Teams and scale: the tests start a real S3-compatible server (moto) on loopback, from a
# venv of its own (its Flask/Werkzeug pins stay out of .venv). PostgreSQL: see .ci/run.
MOTO := .ci/moto-venv/bin/moto_server
test: $(MOTO)
$(MOTO):
	test -x .ci/moto-venv/bin/python || $(PYTHON) -m venv .ci/moto-venv
	.ci/moto-venv/bin/pip install --disable-pip-version-check -q 'moto[server]==5.2.5'
	touch $@

# Benchmarks against other tools (bench/stream_peers.py, bench/balance.py): their packages live in
# bench/.venv, layered on .venv (a .pth adds .venv's site-packages: torch, nsd, duckdb come from
# there), so neither .venv nor pyproject.toml depends on them. Installed with --no-deps and only what
# they need to import and run on local files: mosaicml-streaming's full requirement set would
# downgrade numpy and huggingface_hub (transformers is imported by its DataLoader module).
BENCH_VENV := bench/.venv
BENCH_PKGS := litdata==0.2.76 lightning-utilities==0.15.3 \
	webdataset==1.0.2 braceexpand==0.1.7 \
	mosaicml-streaming==0.13.0 transformers==5.23.0 tokenizers==0.23.3 regex==2026.11.15 \
	brotli==1.2.1 python-snappy==0.7.3 cramjam==2.14.0 zstd==1.5.7.2 catalogue==2.0.10 \
	boto3==1.43.117 s3transfer==0.19.3 requests==2.34.2 certifi==2026.10.19.post1 charset-normalizer==3.5.2 \
	polars==2.1.0 polars-runtime-32==2.1.0

bench-venv: $(BENCH_VENV)/.installed
$(BENCH_VENV)/.installed: $(BIN)/nsd Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > "$$($(BENCH_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_nsd_venv.pth"
	$(BENCH_VENV)/bin/pip install --disable-pip-version-check -q --no-deps $(BENCH_PKGS)
	$(BENCH_VENV)/bin/python -c "import litdata, webdataset, streaming, polars, nsd.engine.stream"
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
	rm -rf $(STORE) $(STORE)-report.html .pytest_cache
