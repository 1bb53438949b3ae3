# The two set-up commands of the README: `make demo` (main job on the embedded data) and `make test`.
RECIPE ?= recipes/basicmotions-ttlora.yaml
RUN    ?= runs/basicmotions-ttlora
ENGINE ?= engines/basicmotions-ttlora
ET      = .venv/bin/edgetool

.PHONY: install demo test
install:
	bash scripts/install.sh

demo: install
	$(ET) adapt $(RECIPE) --out $(RUN)
	$(ET) fuse-export $(RUN) --out $(ENGINE)
	$(ET) verify $(ENGINE) --engine auto

test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider
