# One command on a fresh machine: `make train` (the digits run) or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch pair this machine installs from its own disk; users' clusters bring their own.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install train sample test test-fast bench bench-quality bench-gpu lint clean

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
	$(PY) -m diffusion.evaluate --features digits outputs/digits/sample/samples.npz

# One thread per process: the tests run small networks and start several processes at once, and on two
# cores two threads per process mostly wait for each other.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# The developers' inner loop: the unit tier only (tests/conftest.py assigns the tiers), under 3 minutes here.
test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m unit

bench: install
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/eval_bench.py --batch 8 --seconds 10

# Which sampler at which budget: every sampler at NFE 5..50 (and DDIM 50, DDPM 250) on the `make train` digits
# model (trained first when outputs/digits has no checkpoint), CFG 2; writes docs/sampler_quality.{md,json,png}.
bench-quality: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/sampler_quality.py --out docs

# On one GPU: ADM's ImageNet 64 and 128 models at per-GPU batches of the paper's global batches (2048 and 256
# spread over 32 and 8 GPUs); MFU against the H100 SXM's dense bf16 peak (set PEAK_TFLOPS for other cards).
# Then DiT-XL/2 on DiT's 32x32x4 ImageNet 256 latents at batch 32 (DiT's global 256 over 8 GPUs), no levers.
PEAK_TFLOPS ?= 989
bench-gpu: install
	$(PY) benchmarks/bench.py --device cuda --models unet_64 unet_128 --batch unet_64=64 unet_128=32 \
		--skip data --seconds 3 --peak-tflops $(PEAK_TFLOPS) --levers channels_last sdpa optimizer_foreach compile
	$(PY) benchmarks/bench.py --device cuda --models dit_xl_2 --batch dit_xl_2=32 \
		--skip data sampling --seconds 3 --warmup 2 --peak-tflops $(PEAK_TFLOPS)
	$(PY) benchmarks/eval_bench.py --device cuda --metrics 50000

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs multirun .pytest_cache
