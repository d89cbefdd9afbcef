# Two commands do all set-up on a fresh machine (Debian 12, Python 3.11):
#   make demo   the whole loop on this machine (tracker, agent, tune, build, package, flash, bench)
#   make test   the test suite (installs sshd, the aarch64 toolchain and the emulated board when missing)
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.edgetune-installed

.PHONY: demo test board board-stop venv clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	# xgboost-cpu replaces the CUDA build (and its NVIDIA NCCL) that older venvs had: both own `xgboost`.
	! $(VENV)/bin/python -m pip show -q xgboost 2>/dev/null || $(VENV)/bin/python -m pip uninstall -q -y xgboost nvidia-nccl-cu12
	$(VENV)/bin/python -m pip install -q -e '.[host,test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	bash scripts/install-system-deps.sh demo
	$(VENV)/bin/edgetune demo

test: $(STAMP)
	bash scripts/install-system-deps.sh test
	$(VENV)/bin/python -m pytest

# The emulated Raspberry Pi 4 (arm64 rootfs under qemu-user), cached outside the checkout.
board: $(STAMP)
	$(VENV)/bin/python scripts/emulated_board.py build

board-stop: $(STAMP)
	$(VENV)/bin/python scripts/emulated_board.py stop

clean:
	rm -rf $(VENV) *.egg-info
