# The README's commands.  Everything a target needs it installs itself (Python venv, apt
# packages when run as root), so both work on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TESTS ?= tests

.PHONY: run test install clean deb test-deb

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	tools/bootstrap $(PYTHON) $(VENV)
	touch $@

run: install
	$(BIN)/twistd --nodaemon --pidfile= synckit

# The storage and pub/sub tests start their own PostgreSQL and Redis (tests/services.py); here
# they must, rather than be skipped.
test: install
	tools/install-test-deps
	SYNCKIT_REQUIRE_SERVICES=true tools/run-tests $(BIN) $(TESTS)

# The Debian package (dh-virtualenv), in dist/; and its install/run/purge test (as root).
deb:
	tools/build-deb

test-deb:
	tools/test-deb

clean:
	rm -rf $(VENV) _trial_temp build dist *.egg-info twisted/plugins/dropin.cache
