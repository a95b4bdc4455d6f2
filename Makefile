# socketserver -- build, test, demo and install the Tcl extension.
#
#   make            build build/libsocketserver.so and build/pkgIndex.tcl
#   make test       install what is missing, build, run cargo test and tests/all.tcl
#   make demo       install what is missing, build, serve examples/http_server.tcl
#                   on 127.0.0.1:8080 with 4 workers, HTTP/1.1 keep-alive, idle
#                   connections parked in the dispatcher (Ctrl-C stops it)
#   make install    copy the package to $(DESTDIR)$(TCLLIBDIR)/socketserver$(VERSION)
#   make bench      the benchmark (QUICK=1: about 2.5 minutes; RUNS=n: runs per setup)
#   make clean      remove build/ and cargo's target/
#
# Use the built package without installing it:
#   TCLLIBPATH=$(pwd)/build tclsh     then     package require socketserver

CARGO     ?= cargo
TCLSH     ?= tclsh
PREFIX    ?= /usr/local
DESTDIR   ?=
# /usr/local/lib/tcltk is on the auto_path of Debian's tclsh.  With another
# PREFIX, pick a directory your tclsh searches, or point TCLLIBPATH at it.
TCLLIBDIR ?= $(PREFIX)/lib/tcltk
MANDIR    ?= $(PREFIX)/share/man
TESTFLAGS ?=

DEMO_ADDR    ?= 127.0.0.1
DEMO_PORT    ?= 8080
DEMO_WORKERS ?= 4

NAME     := socketserver
VERSION  := $(shell sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
LIBFILE  := lib$(NAME).so
BUILD    := build
TARGET   := $(or $(CARGO_TARGET_DIR),target)
TCLFILES := $(sort $(notdir $(wildcard tcl/*.tcl)))
PKGDIR   := $(DESTDIR)$(TCLLIBDIR)/$(NAME)$(VERSION)
RUN_TCL  := TCLLIBPATH=$(abspath $(BUILD)) $(TCLSH)

ifeq ($(VERSION),)
$(error cannot read the package version from Cargo.toml)
endif

# Prerequisites run left to right (deps before the build); cargo parallelises itself.
.NOTPARALLEL:
.PHONY: all test demo install uninstall clean bench deps bench-deps help

all:
	$(CARGO) build --release
	@mkdir -p $(BUILD)
	cp $(TARGET)/release/$(LIBFILE) $(BUILD)/$(LIBFILE).tmp
	mv -f $(BUILD)/$(LIBFILE).tmp $(BUILD)/$(LIBFILE)
ifneq ($(TCLFILES),)
	cp $(addprefix tcl/,$(TCLFILES)) $(BUILD)/
endif
	sed -e 's|@VERSION@|$(VERSION)|g' -e 's|@LIBFILE@|$(LIBFILE)|g' \
	    -e 's|@TCLFILES@|$(TCLFILES)|g' pkgIndex.tcl.in > $(BUILD)/pkgIndex.tcl.tmp
	mv -f $(BUILD)/pkgIndex.tcl.tmp $(BUILD)/pkgIndex.tcl

test: deps all
	$(CARGO) test --release
	$(RUN_TCL) tests/all.tcl $(TESTFLAGS)

demo: deps all
	$(RUN_TCL) examples/http_server.tcl -myaddr $(DEMO_ADDR) -port $(DEMO_PORT) -workers $(DEMO_WORKERS) \
	    -wait head -keepalive park

install: all
	install -d $(PKGDIR)
	install -m 755 $(BUILD)/$(LIBFILE) $(PKGDIR)/
	install -m 644 $(BUILD)/pkgIndex.tcl $(addprefix $(BUILD)/,$(TCLFILES)) $(PKGDIR)/
	install -d $(DESTDIR)$(MANDIR)/mann
	install -m 644 doc/$(NAME).n $(DESTDIR)$(MANDIR)/mann/$(NAME).n

uninstall:
	rm -rf $(PKGDIR)
	rm -f $(DESTDIR)$(MANDIR)/mann/$(NAME).n

bench: bench-deps all
	$(CARGO) build --release --example limit --example clients
	$(RUN_TCL) bench/run.tcl $(if $(filter 1 yes true,$(QUICK)),-quick) $(if $(RUNS),-runs $(RUNS))

deps:
	scripts/deps.sh

bench-deps:
	scripts/deps.sh --bench

clean:
	rm -rf $(BUILD)
	$(CARGO) clean

help:
	@sed -n '3,13s/^# \{0,1\}//p' Makefile
