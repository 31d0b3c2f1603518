# The two commands: `make up` starts the whole local stack, `make test` runs the suite.
# Both install into .venv first. On a host without an NVIDIA GPU the CPU build of torch is
# pinned before the project, so pip does not pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CPU_TORCH := torch==2.13.0
UP_ARGS ?=

.PHONY: install up down test lint typecheck k8s chaos hostile bench load fleet clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the CUDA build of torch"; \
	else \
		echo "no GPU: pinning the CPU build $(CPU_TORCH)"; \
		$(BIN)/pip install --quiet $(CPU_TORCH); \
	fi
	$(BIN)/pip install --quiet -e '.[api,worker,dev]'
	@touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/sdq up $(UP_ARGS)

down:
	$(BIN)/sdq down

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy common producer workers

RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672//

# Two passes run beside the main one, their output shown after it; on two cores much of each
# is waiting on servers. The RabbitMQ pass runs the suites whose path crosses the broker
# again, over AMQP. The standalone pass runs the suites that need none of the session's
# servers: those that start whole stacks of their own (chaos, hostile tenants, the benches'
# smoke runs, `sdq up`) and those that run the tiny pipelines in the test process.
RABBITMQ_SUITES := tests/e2e/test_broker.py tests/e2e/test_store_outage.py \
	tests/e2e/test_async_api.py tests/e2e/test_poison.py
STANDALONE_SUITES := tests/e2e/test_chaos.py tests/e2e/test_hostile.py tests/e2e/test_stack.py \
	tests/e2e/test_stack_supervisor.py tests/integration/test_bench_script.py \
	tests/integration/test_fleet_smoke.py tests/integration/test_gpu_bench_smoke.py \
	tests/integration/test_tiny_model.py tests/integration/test_gpu_compile.py \
	tests/integration/test_gpu_precision.py tests/integration/test_family_models.py
# The passes share the cores: one torch thread per process (test or worker), or pipelines side
# by side thrash each other many times slower (docs/benchmarks.md, CPU workers side by side).
PYTEST := OMP_NUM_THREADS=1 $(BIN)/pytest -p no:cacheprovider

test: lint typecheck
	@if $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', 5672), 2)" 2>/dev/null; then \
		echo "RabbitMQ answers on 127.0.0.1:5672: the suites whose path crosses the broker run again with it, beside the main pass"; \
		SDQ_TEST_BROKER=$(RABBITMQ_URL) $(PYTEST) --basetemp=$(VENV)/rabbitmq-pass \
			$(RABBITMQ_SUITES) > $(VENV)/rabbitmq-pass.log 2>&1 & rabbit=$$!; \
	else \
		echo "SKIPPED the RabbitMQ run: nothing answers on 127.0.0.1:5672"; rabbit=; \
	fi; \
	$(PYTEST) --basetemp=$(VENV)/standalone-pass $(STANDALONE_SUITES) \
		> $(VENV)/standalone-pass.log 2>&1 & standalone=$$!; \
	$(PYTEST) --basetemp=$(VENV)/main-pass $(addprefix --ignore=,$(STANDALONE_SUITES)); main=$$?; \
	wait $$standalone; alone=$$?; \
	echo "--- the standalone pass (stacks of their own):"; cat $(VENV)/standalone-pass.log; \
	second=0; \
	if [ -n "$$rabbit" ]; then \
		wait $$rabbit; second=$$?; \
		echo "--- the RabbitMQ pass (SDQ_TEST_BROKER=$(RABBITMQ_URL)):"; cat $(VENV)/rabbitmq-pass.log; \
	fi; \
	test $$main -eq 0 -a $$alone -eq 0 -a $$second -eq 0

# 300 jobs under 44 faults; prints one line and fails if anything was lost, stuck, doubled or
# left unrefunded. BROKER=amqp://guest:guest@127.0.0.1:5672// runs it against RabbitMQ.
chaos: install
	$(BIN)/python bench/chaos.py $(if $(BROKER),--broker $(BROKER))
	$(BIN)/python bench/chaos.py --jobs 20 --child-kills 0 --main-kills 0 --valkey-restarts 0 \
		--valkey-outages 0 --api-kills 0 --burst-kills 0 --s3-stops 0 --sync 0 --canary \
		$(if $(BROKER),--broker $(BROKER))

# Every hostile-tenant attack on a stack of its own; one line, non-zero if any hurt.
hostile: install
	$(BIN)/python bench/hostile.py

bench: install
	$(BIN)/python bench/bench.py

# 200 submissions/s for 60 s against the API on loopback.
load: install
	$(BIN)/python bench/load.py --rate 200 --duration 60

# A fleet of sleeping GPU workers (real Celery, store, S3, webhooks) at 8, 16 and 32 workers,
# 10,000 jobs at 32: how cost grows; one figure a line, JSON in bench/fleet.json. ~30 min.
FLEET_ARGS ?= --sizes 8,16,32 --jobs 10000
fleet: install
	$(BIN)/python bench/fleet.py $(FLEET_ARGS)

k8s: install
	$(BIN)/python infra/k8s/render.py > infra/k8s/workers.yaml

clean:
	rm -rf $(VENV) .sdq .pytest_cache .mypy_cache .ruff_cache *.egg-info
