# hyphae + dimension. `make help` lists the targets.
GO        ?= go
BIN       ?= bin
KERNELS   ?= /var/cache/hyphae/kernels
# Guest binaries must be static: CGO_ENABLED=0 for everything we build.
export CGO_ENABLED = 0

.PHONY: help deps fc-kernel build install test test-short fuzz bench demo demo-hyphae clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

deps: ## install apt packages and the test kernel (idempotent; needs root)
	./scripts/install-deps.sh

build: ## build every binary into ./bin (hyphae finds hyphae-init next to itself)
	$(GO) build -trimpath -o $(BIN)/ ./cmd/...

install: ## go install every binary (statically linked)
	$(GO) install -trimpath ./cmd/...

fc-kernel: deps ## build (once, ~13 min, cached) the Firecracker-style kernel the virtio tests boot
	./scripts/build-fc-kernel.sh $(KERNELS) >/dev/null

test: fc-kernel ## install what the tests need, then run every test with real VMs required
	cd sdk/js && node --test
	@# A PostgreSQL that cannot start stops here, not as 30 confusing test failures.
	db_url="$$(./scripts/postgres.sh)" && \
	HYPHAE_E2E=require HYPHAE_TEST_KERNEL=$(KERNELS)/vmlinuz HYPHAE_TEST_FC_KERNEL=$(KERNELS)/vmlinux-fc \
	HYPHAE_TEST_DATABASE_URL="$$db_url" \
		$(GO) test -count=1 -p 2 -timeout 25m ./...

test-short: ## unit tests only, no VMs, no root
	$(GO) test -short ./...

fuzz: ## run each fuzz target for a short while
	./scripts/fuzz.sh 20s

bench: build deps ## benchmarks (each prints ratios against a baseline measured in the same run)
	$(GO) run ./bench/build
	$(GO) run ./bench/boot
	$(GO) run ./bench/gateway

demo: deps build ## the main job: dimension on embedded defaults runs the echo bundle once in a microVM
	./scripts/dimension-demo.sh

demo-hyphae: deps build ## hyphae alone: build the Go example and run it in a microVM
	./scripts/demo.sh

clean:
	rm -rf $(BIN)
