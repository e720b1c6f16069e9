# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/shapes
DEMO_PROMPTS := "a red circle" "a blue square" "a yellow triangle" "a green circle" "a purple square" "an orange triangle"

.PHONY: install model demo test clean

$(VENV)/.installed: pyproject.toml
	@echo "Creating $(VENV) and installing minidiff with torch, torchvision, diffusers, transformers and pytest:"
	@echo "done once; it took 80 s on a fresh clone with a fast connection (mostly downloading torch), longer on a slow one."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,app]'
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
