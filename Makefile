# One command on a fresh machine: `make train` (the digits run) or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch pair this machine installs from its own disk; users' clusters bring their own.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install train sample test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

train: install
	$(PY) train.py experiment=digits hydra.run.dir=outputs/digits
	$(PY) sample.py checkpoint=outputs/digits/checkpoints/latest.pt num_samples=100 batch_size=100 \
		solver=dpm_solver guidance_scale=2 hardware.num_threads=1 hydra.run.dir=outputs/digits/sample
	$(PY) -m diffusion.evaluate outputs/digits/sample/samples.npz

# One thread per process: the tests run small networks and start several processes at once, and on two
# cores two threads per process mostly wait for each other.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench.py

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs multirun .pytest_cache
