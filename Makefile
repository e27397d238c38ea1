# Bootstrap: each target installs what it needs (venv, packages, OpenSSH server, GnuPG).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)

.PHONY: demo test lint bench deps sshd gpg

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,demo,bench,dask,dask-report]'
	touch $@

deps: $(VENV)/.installed

sshd:
	@[ -x /usr/sbin/sshd ] || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server; }

# PGP-encrypted files (SPEC §12) go through the system GnuPG.
gpg:
	@command -v gpg >/dev/null && command -v gpgconf >/dev/null || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnupg; }

demo: deps sshd gpg
	$(PY) run_pipeline.py demo

test: lint sshd gpg
	$(PY) -m pytest -q

lint: deps
	$(PY) -m ruff check pipeline localdev tests benchmarks
	$(PY) -m mypy

bench: deps
	$(PY) benchmarks/bench_pipeline.py --lines 1000000
