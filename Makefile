# virt-trimd developer entry points. Run as root on a Debian/Ubuntu host.
PYTHON ?= python3
export PYTHONPATH := $(CURDIR)/daemon:$(CURDIR)/tests

.PHONY: help install deps deb lint test test-fast test-e2e test-system demo bench bench-smoke fleet-sim example-config clean

help:
	@echo "make demo        install what is missing, boot a throwaway guest, trim it, show metrics"
	@echo "make test        ruff, mypy and the whole pytest suite (end-to-end included)"
	@echo "make test-fast   unit and integration tiers only (no guests)"
	@echo "make bench       benchmarks on the real rig (slow); bench-smoke for a quick pass"
	@echo "make fleet-sim   one night of 10/50/200 hosts on one storage, simulated (docs/fleet.md)"
	@echo "make deb         build dist/virt-trimd_<version>_all.deb (dpkg-buildpackage, lintian)"
	@echo "make test-system the system tier alone: booted Debian 12 and 13, the real .deb"
	@echo "make install     pip install the package (console script virt-trimd)"

deps:
	bash .ci/install-deps.sh

install:
	$(PYTHON) -m pip install .

deb:
	bash .ci/build-deb.sh

lint:
	ruff check daemon tests
	ruff format --check daemon tests
	mypy
	cd deploy/ansible && ansible-lint --offline -q

test: deps lint
	$(PYTHON) -m pytest tests -v -p no:cacheprovider --durations=15

test-fast: lint
	$(PYTHON) -m pytest tests/unit tests/integration -q

test-e2e: deps
	$(PYTHON) -m pytest tests/e2e -v

test-system: deps
	$(PYTHON) -m pytest tests/system -v -p no:cacheprovider

demo: deps
	$(PYTHON) tests/demo.py

bench: deps
	$(PYTHON) -m bench

bench-smoke: deps
	$(PYTHON) -m bench --smoke

fleet-sim:
	$(PYTHON) -m sim

example-config:
	$(PYTHON) -m virt_trimd.config > config/virt-trimd.example.yaml

clean:
	PYTHONPATH=tests $(PYTHON) -m rig down || true
	rm -rf .rig-cache build dist *.egg-info
