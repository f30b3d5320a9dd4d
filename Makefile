# skillguard: two commands on a fresh Debian 12 machine.
#   sudo make run    set up what is missing, then start the agent in the foreground
#   sudo make test   set up what is missing, then run unit, kernel and e2e tests
# Everything else is a helper. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
# One shell per recipe, so recipes can keep variables between lines.
.ONESHELL:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV := .venv
PYTHON := $(VENV)/bin/python
BUILD := build
# pytest gets SIGINT (it still prints its summary) after this many seconds;
# the whole `make test` must stay under 15 minutes.
TEST_TIMEOUT ?= 840
PYTEST_ARGS ?=

.PHONY: help setup setup-bench run test unit bench lint verify-unit clean

help:
	@echo "sudo make run          set up (apt, kernel headers, .venv) and start the agent"
	@echo "sudo make test         set up and run tests/unit, tests/kernel, tests/e2e"
	@echo "make unit              unit tests only, no root, no set-up (needs .venv)"
	@echo "sudo make setup        only the idempotent set-up (scripts/setup.sh)"
	@echo "sudo make bench        set up with bubblewrap/firejail/gcc and run bench/*/run.*"
	@echo "make lint              byte-compile everything, syntax-check shell scripts"
	@echo "make verify-unit       systemd-analyze verify systemd/skillguard.service"

setup:
	@scripts/setup.sh

setup-bench:
	@scripts/setup.sh --bench

# `daemon` when agent/cli.py has it; until then doctor, then wait in the
# foreground until SIGINT/SIGTERM. A failing doctor stops here: no agent is
# started on a host it says cannot enforce.
run: setup
	@if $(PYTHON) -m agent daemon --help >/dev/null 2>&1; then
		echo "make run: starting skillguard daemon in the foreground (Ctrl-C or SIGTERM stops it). From another shell:" >&2
		echo "  sudo .venv/bin/skillguard status" >&2
		echo "  sudo .venv/bin/skillguard run --manifest M.yaml -- CMD ARGS      # launched and supervised through the daemon" >&2
		echo "  sudo .venv/bin/skillguard register --manifest M.yaml --pid PID   # confine a process that already runs" >&2
		echo "  sudo .venv/bin/skillguard ps; sudo .venv/bin/skillguard events; curl -s 127.0.0.1:9464/metrics" >&2
		exec $(PYTHON) -m agent daemon
	fi
	$(PYTHON) -m agent doctor || { echo "make run: 'skillguard doctor' failed (exit $$?); not starting" >&2; exit 1; }
	echo "make run: no 'daemon' subcommand yet; waiting in the foreground (Ctrl-C or SIGTERM to stop)" >&2
	exec $(PYTHON) -c '
	import signal, sys
	stop = {signal.SIGINT, signal.SIGTERM}
	signal.pthread_sigmask(signal.SIG_BLOCK, stop)
	received = signal.sigwait(stop)
	print(f"make run: {signal.Signals(received).name}, exiting", file=sys.stderr)
	'

test: setup
	@mkdir -p $(BUILD)
	log=$(BUILD)/pytest.log
	set +e
	timeout --signal=INT --kill-after=60 $(TEST_TIMEOUT) \
		$(PYTHON) -m pytest -q tests $(PYTEST_ARGS) </dev/null 2>&1 | tee "$$log"
	status=$${PIPESTATUS[0]}
	set -e
	summary=$$(grep -E '^(=+ )?(no tests ran|[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)\b)' "$$log" | tail -n 1 || true)
	echo "make test: pytest summary: $${summary:-<none: see $$log>}"
	case $$status in
		0) ;;
		5) echo "make test: FAILED: pytest collected no tests (exit 5); an empty suite is not a pass" >&2 ;;
		124|130) echo "make test: FAILED: pytest did not finish within $(TEST_TIMEOUT)s" >&2 ;;
		*) echo "make test: FAILED: pytest exit $$status (log: $$log)" >&2 ;;
	esac
	exit $$status

unit:
	@test -x $(PYTHON) || { echo "make unit: no $(PYTHON); run 'sudo make setup' first" >&2; exit 1; }
	$(PYTHON) -m pytest -q tests/unit $(PYTEST_ARGS)

# Runs every bench/*/run.* (executable ones directly, *.py with the venv).
# No benchmark at all is an error, as is any failing one; all are run first.
bench: setup-bench
	@shopt -s nullglob
	runners=(bench/*/run.*)
	(( $${#runners[@]} )) || { echo "make bench: no bench/*/run.* found" >&2; exit 1; }
	failed=()
	for runner in "$${runners[@]}"; do
		echo "== $$runner"
		case $$runner in
			*.py) cmd=($(PYTHON) "$$runner") ;;
			*.sh) cmd=(bash "$$runner") ;;
			*) [[ -x $$runner ]] || { echo "make bench: $$runner is not executable" >&2; failed+=("$$runner"); continue; }
			   cmd=("./$$runner") ;;
		esac
		"$${cmd[@]}" </dev/null || failed+=("$$runner")
	done
	(( $${#failed[@]} == 0 )) || { echo "make bench: FAILED: $${failed[*]}" >&2; exit 1; }

lint:
	@test -x $(PYTHON) || { echo "make lint: no $(PYTHON); run 'sudo make setup' first" >&2; exit 1; }
	$(PYTHON) -m compileall -q agent tests $$(test -d bench && echo bench)
	bash -n scripts/setup.sh .ci/run
	echo "make lint: ok"

# The unit names the install path /opt/skillguard; verify a copy pointing at
# this checkout's venv, since verify rejects an ExecStart binary that is missing.
verify-unit:
	@mkdir -p $(BUILD)/systemd
	sed 's|/opt/skillguard/|$(CURDIR)/|g' systemd/skillguard.service > $(BUILD)/systemd/skillguard.service
	test -x $(CURDIR)/$(VENV)/bin/skillguard || { echo "make verify-unit: no $(VENV)/bin/skillguard; run 'sudo make setup' first" >&2; exit 1; }
	systemd-analyze verify $(BUILD)/systemd/skillguard.service
	echo "make verify-unit: ok"

clean:
	rm -rf $(BUILD) .pytest_cache skillguard.egg-info
	find agent tests -name __pycache__ -type d -prune -exec rm -rf {} +
