# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/shapes
DEMO_PROMPTS := "a red circle" "a blue square" "a yellow triangle" "a green circle" "a purple square" "an orange triangle"

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	@echo "Creating $(VENV) and installing minidiff with torch, torchvision, diffusers, transformers and pytest:"
	@echo "done once; it took 80 s on a fresh clone with a fast connection (mostly downloading torch), longer on a slow one."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,app]'
	touch $@
	@echo "Installed. To run the README's python commands yourself: source $(VENV)/bin/activate"

install: $(VENV)/.installed

# Train the default model (preset chosen by device) unless $(RUN) already holds one, then sample a grid.
$(RUN)/model.safetensors: | install
	$(PY) train.py --out $(RUN)

demo: $(RUN)/model.safetensors
	$(PY) sample.py --model $(RUN) --prompt $(DEMO_PROMPTS) --num-images 4 --out $(RUN)/demo.png --overwrite
	$(PY) -m minidiff.evaluate --model $(RUN)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
