# Developer entry points. `make` alone lists them.
#
# Every target that runs project code depends on `install`, which is idempotent and
# takes well under a second when nothing is missing. After it, commands run with
# `uv run --no-sync`: the environment was just synced from the committed lock file,
# and nothing should quietly re-resolve or rewrite uv.lock on the way.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# Debian packages the test suite needs, installed by `make install` when missing:
# Chromium for the browser tests, promtool (in prometheus), nginx and docker-compose
# for the deployment tests. kubectl is not here: the machine image ships a current
# one, and Debian's kubernetes-client is too old for the manifests. An entry may be
# PACKAGE:COMMAND, which counts as present when COMMAND is on PATH (tools/apt-ensure).
APT_PACKAGES ?= chromium prometheus nginx docker-compose

# Extra arguments for pytest: make test PYTEST_ARGS='-k inbox -x'
PYTEST_ARGS ?=

# The uv PyPI package can run its binary as a module, so a fresh `pip install uv`
# works even where that directory is not on PATH.
UV := $(if $(shell command -v uv 2>/dev/null),uv,python3 -m uv)
RUN := $(UV) run --no-sync

# `make token` takes the user from the command line only: USER is also the login
# name in everybody's environment, and a token for root helps no one.
ifneq ($(filter token,$(MAKECMDGOALS)),)
ifneq ($(origin USER),command line)
$(error usage: make token USER=NAME, one of the seeded users alice bob carol dave)
endif
endif

.PHONY: help install run test token migrate seed lint bench clean clean-mail

help:
	@echo "make install            uv, the Python packages from uv.lock, Debian packages"
	@echo "make run                migrate, seed, then every service and an SMTP sink"
	@echo "make test               the pytest suite (PYTEST_ARGS='...' passes options)"
	@echo "make token USER=bob     a bearer token for a seeded user"
	@echo "make migrate            apply the database migrations"
	@echo "make seed               create the demo users and post (safe to repeat)"
	@echo "make lint               ruff check and ruff format --check"
	@echo "make bench              load test (DURATION=..., RATES=...)"
	@echo "make clean              remove run state under var/ but mail and VAPID keys"
	@echo "make clean-mail         remove the mail the SMTP sink kept"

# Nothing here writes to stdout when all is in place, so that
# BOB=$$(make -s token USER=bob) captures the token alone.
install:
	@command -v uv >/dev/null || python3 -m uv --version >/dev/null 2>&1 \
		|| PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install \
			--quiet --root-user-action=ignore uv >&2
	@$(UV) sync --frozen --all-packages --quiet
	@tools/apt-ensure $(APT_PACKAGES)

run: install
	@$(RUN) python tools/devrun.py

# Any pytest status but 0 fails the target, 5 (nothing collected) included.
test: install
	@$(RUN) pytest $(PYTEST_ARGS)

# The name goes through the environment, not the recipe's text, so that no quote
# in it can end the command early.
token: install
	@$(RUN) notiflow-token "$$USER"

migrate: install
	@$(RUN) notiflow-migrate

seed: install
	@$(RUN) notiflow-seed

lint: install
	@$(RUN) ruff check . && $(RUN) ruff format --check .

bench: install
	@$(RUN) python bench/run.py $(if $(DURATION),--duration $(DURATION)) \
		$(if $(RATES),--rates $(RATES))

# Everything under var/ is state that `make run` makes again, except the mail the
# sink kept, which someone may still want to read, and the push sender's VAPID keys:
# browsers subscribed with them stop receiving pushes once they change.
clean:
	@if [[ -d var ]]; then \
		find var -mindepth 1 -maxdepth 1 ! -name mail ! -name vapid -exec rm -rf {} +; \
	fi

clean-mail:
	@rm -rf var/mail
