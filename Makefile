# The two commands of the README:
#   make example   set up, then analyse the bundled example recording into example-results/
#   make test      set up, then run the test suite (CI's .ci/run calls exactly this)
#   make lint      ruff check, ruff format --check and mypy (CI's .ci/run runs it before the tests)
# Shared data (real recording, model, rebuilt YAMNet) is read from ../shared unless
# BUZZDASK_SHARED_DIR points elsewhere.

SHELL := /bin/bash
BUZZDASK_SHARED_DIR ?= $(abspath $(CURDIR)/../shared)
export BUZZDASK_SHARED_DIR
VENV := .venv
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test-setup example test lint

# What the example needs: the package in a venv. No root: without a system ffmpeg built with
# soxr, buzzdask uses the imageio-ffmpeg wheel's.
setup: $(VENV)/.installed

# The tests also make audio with a system ffmpeg/ffprobe and copy with rclone (apt, as root).
test-setup: $(VENV)/.installed-test
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null && command -v rclone >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq ffmpeg rclone; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

example: setup
	$(VENV)/bin/buzzdask analyze "$(BUZZDASK_SHARED_DIR)/data/audio_in" \
	  --model "$(BUZZDASK_SHARED_DIR)/data/models/model_general_v3" \
	  --embedder "$(BUZZDASK_SHARED_DIR)/models/yamnet/saved_model_wholehop" \
	  --output example-results --new --threshold ins_buzz=-1.2 --chunk-seconds 2 -v

# pytest exits 5 when it collected no test: that is not a failure of the suite.
test: test-setup
	$(VENV)/bin/python -m pytest; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# mypy reads its files and options from pyproject.toml ([tool.mypy]).
lint: test-setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
