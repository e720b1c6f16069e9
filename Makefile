# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/shapes
# TORCH_INDEX=cpu: torch and torchvision from PyTorch's own index for that build (cpu: nothing for CUDA, an
# estimated 1.6 GB of .venv instead of 6.2 GB), installed first, on a new .venv only; empty: PyPI's (CUDA on Linux)
TORCH_INDEX ?=
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check
DEMO_PROMPTS := "a red circle" "a blue square" "a yellow triangle" "a green circle" "a purple square" "an orange triangle"

.PHONY: install model demo test clean

$(VENV)/.installed: pyproject.toml
	@echo "Creating $(VENV) and installing minidiff with torch, torchvision, diffusers, transformers, Gradio and pytest:"
	@echo "done once; it took 80 s on a fresh clone with a fast connection (mostly downloading torch), longer on a slow one."
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PIP_INSTALL) torch torchvision --index-url https://download.pytorch.org/whl/$(TORCH_INDEX))
	$(PIP_INSTALL) -e '.[test,app]'
	touch $@
	@echo "Installed. To run the README's python commands yourself: source $(VENV)/bin/activate"

install: $(VENV)/.installed

# Train the default model (preset chosen by device), then sample a grid. A run stopped early (Ctrl-C)
# is resumed to its last step first (train.py says when a run is already finished); a model in
# $(RUN) without checkpoints is used as it is.
model: install
	@if [ -n "$$(ls -d $(RUN)/checkpoints/step-* 2>/dev/null)" ]; then \
		echo "$(PY) train.py --out $(RUN) --resume"; $(PY) train.py --out $(RUN) --resume; \
	elif [ ! -f $(RUN)/model.safetensors ]; then \
		echo "$(PY) train.py --out $(RUN)"; $(PY) train.py --out $(RUN); fi

demo: model
	$(PY) sample.py --model $(RUN) --prompt $(DEMO_PROMPTS) --num-images 4 --out $(RUN)/demo.png --overwrite
	$(PY) -m minidiff.evaluate --model $(RUN)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
