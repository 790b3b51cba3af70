# The two commands of the README. Each creates the virtual environment on first use.
#   make demo   simulator -> daemon -> shipped model for 20 s: stats table + stemd-demo.png
#   make test   the test suite
#   make lint   ruff, mypy and the import contracts (import-linter) of pyproject.toml
# TORCH picks the torch build: the default is the CPU wheel; on a CUDA PC use e.g. TORCH=torch==2.13.0
# with the CUDA index of your choice, or install torch yourself first and pass TORCH=torch.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# The napari plugin's Qt and OpenGL need these Debian packages, and its headless tests an X server for OpenGL
# contexts (Xvfb; Mesa's llvmpipe draws); installed when missing where apt-get can (as root, as in CI).
DEBS := xvfb libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 \
	libdbus-1-3 libglib2.0-0 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 \
	libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xkb1

.PHONY: demo test lint install clean debs
demo: $(VENV)/.installed
	$(BIN)/stemd demo

test: $(VENV)/.installed lint
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check stemd tests bench
	$(BIN)/mypy stemd
	$(BIN)/lint-imports

install: $(VENV)/.installed

debs:
	@command -v dpkg-query >/dev/null || exit 0; \
	missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "warning: the napari plugin and its tests need these Debian packages:" $$missing; \
	fi

$(VENV)/.installed: pyproject.toml | debs
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,bench,dev,dask,metrics,formats,napari]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
