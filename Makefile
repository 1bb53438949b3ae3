# The two set-up commands of the README: `make demo` (main job on the embedded data; runtime dependencies
# only) and `make test` (adds the test extras, then runs the suite).
RECIPE ?= recipes/basicmotions-ttlora.yaml
RUN    ?= runs/basicmotions-ttlora
ENGINE ?= engines/basicmotions-ttlora
ET      = .venv/bin/edgetool

.PHONY: install install-test demo test
install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test

demo: install
	$(ET) adapt $(RECIPE) --out $(RUN)
	$(ET) fuse-export $(RUN) --out $(ENGINE)
	$(ET) verify $(ENGINE) --engine auto

test: install-test
	.venv/bin/python -m pytest -q -p no:cacheprovider
