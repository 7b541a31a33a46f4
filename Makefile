# Linli: one non-recursive Makefile. `make` builds every daemon and linlictl
# into ./bin. `make run` and `make test` are the two commands of the README.
#
#   make SANITIZE=address,undefined   build with sanitizers (into build-san/, bin-san/)
#   make V=1                          show full commands
#
# Sources are found by wildcard: common/*.c is the shared library, each
# services/<name>/ is one program (main.c plus the rest, which unit tests may
# link as lib<name>.a), tests/unit/test_*.c are cmocka suites.

.DELETE_ON_ERROR:
.SUFFIXES:

CC ?= cc
ifeq ($(origin CC),default)
CC = cc
endif

SANITIZE ?=
ifneq ($(SANITIZE),)
BUILD ?= build-san
BIN ?= bin-san
SAN_FLAGS = -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -fno-sanitize-recover=all
else
BUILD ?= build
BIN ?= bin
SAN_FLAGS =
endif

PKGS = libzmq libprotobuf-c hiredis libpq libevent jansson libqrencode openssl uuid
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
CMOCKA_LIBS := $(shell pkg-config --libs cmocka 2>/dev/null)

VERSION := 0.1.0
WARN = -Wall -Wextra -Werror -Wmissing-prototypes -Wstrict-prototypes -Wvla \
       -Wwrite-strings -Wno-missing-field-initializers
CFLAGS ?= -O2 -g
ALL_CFLAGS = -std=gnu11 $(WARN) -fno-common $(CFLAGS) $(SAN_FLAGS) -MMD -MP \
             -D_GNU_SOURCE -DLINLI_VERSION='"$(VERSION)"' \
             -Icommon -I$(BUILD)/gen $(PKG_CFLAGS)
ALL_LDFLAGS = $(LDFLAGS) $(SAN_FLAGS)
LIBS = $(PKG_LIBS) -lm

ifeq ($(V),1)
Q =
else
Q = @
endif

PROTOS := $(wildcard proto/*.proto)
GEN_C := $(patsubst proto/%.proto,$(BUILD)/gen/%.pb-c.c,$(PROTOS))
GEN_H := $(GEN_C:.c=.h)

COMMON_SRCS := $(wildcard common/*.c)
COMMON_OBJS := $(patsubst %.c,$(BUILD)/obj/%.o,$(COMMON_SRCS)) \
               $(patsubst $(BUILD)/gen/%.c,$(BUILD)/obj/gen/%.o,$(GEN_C))
LIBCOMMON := $(BUILD)/libcommon.a

SERVICES := $(notdir $(patsubst %/,%,$(dir $(wildcard services/*/main.c))))
PROGRAMS := $(foreach s,$(SERVICES),$(BIN)/$(if $(filter linlictl,$(s)),linlictl,linli-$(s)))

UNIT_SRCS := $(wildcard tests/unit/test_*.c)
UNIT_BINS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRCS))
BENCH_SRCS := $(wildcard tests/bench/*.c)
BENCH_BINS := $(patsubst tests/bench/%.c,$(BUILD)/bench/%,$(BENCH_SRCS))

all: $(PROGRAMS)
tests: $(UNIT_BINS)
bench-tools: $(BENCH_BINS)

$(BUILD)/gen/%.pb-c.c $(BUILD)/gen/%.pb-c.h: proto/%.proto $(PROTOS)
	@mkdir -p $(@D)
	@echo "  PROTOC  $<"
	$(Q)protoc-c -Iproto --c_out=$(BUILD)/gen $<

$(BUILD)/obj/gen/%.o: $(BUILD)/gen/%.c $(GEN_H)
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(ALL_CFLAGS) -Wno-missing-prototypes -c -o $@ $<

$(BUILD)/obj/%.o: %.c $(GEN_H)
	@mkdir -p $(@D)
	@echo "  CC      $<"
	$(Q)$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(LIBCOMMON): $(COMMON_OBJS)
	@echo "  AR      $@"
	$(Q)rm -f $@ && ar rcs $@ $^

# One program per service directory; the non-main objects also form
# lib<svc>.a so that unit tests can link the service's modules.
define SERVICE_template
$(1)_SRCS := $$(filter-out services/$(1)/main.c,$$(wildcard services/$(1)/*.c))
$(1)_OBJS := $$(patsubst %.c,$(BUILD)/obj/%.o,$$($(1)_SRCS))
$(BUILD)/lib$(1).a: $$($(1)_OBJS)
	@echo "  AR      $$@"
	$(Q)rm -f $$@ && ar rcs $$@ $$^
$(BIN)/$(if $(filter linlictl,$(1)),linlictl,linli-$(1)): $(BUILD)/obj/services/$(1)/main.o $(BUILD)/lib$(1).a $(LIBCOMMON)
	@mkdir -p $$(@D)
	@echo "  LINK    $$@"
	$(Q)$(CC) $(ALL_LDFLAGS) -o $$@ $$^ $(LIBS)
endef
$(foreach s,$(SERVICES),$(eval $(call SERVICE_template,$(s))))

# A unit test named test_<svc>_*.c also links that service's library.
test_svc = $(firstword $(filter $(SERVICES),$(word 2,$(subst _, ,$(1)))))
.SECONDEXPANSION:
$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $$(if $$(call test_svc,$$*),$(BUILD)/lib$$(call test_svc,$$*).a) $(LIBCOMMON)
	@mkdir -p $(@D)
	@echo "  LINK    $@"
	$(Q)$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LIBS) $(CMOCKA_LIBS)

$(BUILD)/bench/%: $(BUILD)/obj/tests/bench/%.o $(LIBCOMMON)
	@mkdir -p $(@D)
	@echo "  LINK    $@"
	$(Q)$(CC) $(ALL_LDFLAGS) -o $@ $^ $(LIBS) -lpthread

# libFuzzer targets: clang, with address and undefined sanitizers.
FUZZ_SRCS := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BINS := $(patsubst tests/fuzz/%.c,build-fuzz/%,$(FUZZ_SRCS))
fuzz: $(FUZZ_BINS)
ifneq ($(BUILD),build-fuzz)
build-fuzz/libcommon.a: $(COMMON_SRCS) $(PROTOS) $(wildcard common/*.h)
	$(Q)$(MAKE) --no-print-directory BUILD=build-fuzz BIN=build-fuzz/bin CC=clang \
	    SANITIZE=fuzzer-no-link,address,undefined build-fuzz/libcommon.a
endif
build-fuzz/fuzz_%: tests/fuzz/fuzz_%.c build-fuzz/libcommon.a
	@echo "  FUZZ    $@"
	$(Q)clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Icommon -Ibuild-fuzz/gen \
	    $(PKG_CFLAGS) -o $@ $< build-fuzz/libcommon.a $(LIBS)

run:
	@scripts/run

test:
	@scripts/test

version:
	@echo $(VERSION)

clean:
	rm -rf build build-san build-fuzz bin bin-san

.PHONY: all tests bench-tools fuzz run test clean version
.PRECIOUS: $(BUILD)/gen/%.pb-c.c $(BUILD)/gen/%.pb-c.h $(BUILD)/obj/%.o

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
