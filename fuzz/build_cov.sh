#!/usr/bin/env bash
# Build a coverage-instrumented copy of the compiled wire core for the fuzz harnesses.
#
#   fuzz/build_cov.sh [OUT_DIR]          # default: fuzz/.covbuild
#   PYTHONPATH=fuzz/.covbuild python fuzz/fuzz_frames.py ...
#
# The normal extension is built without instrumentation, so libFuzzer drives it blind
# (only the Python around it gives coverage).  This copies src/virnet to OUT_DIR and
# compiles pyx/virnet/_wire.pyx there with clang's SanitizerCoverage (8-bit counters,
# PC table, comparison tracing), linked against atheris's bundled libFuzzer so that the
# counters register with the same fuzzer that atheris runs.  No sanitizer (ASan) is used.
# Needs clang (Debian: apt-get install clang) and Cython (pip install 'Cython>=3.1,<4').
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-fuzz/.covbuild}"
rm -rf "$out"
mkdir -p "$out"
cp -r src/virnet "$out/"
rm -f "$out"/virnet/*.so
python -m cython -3 -I pyx -o "$out/_wire.c" pyx/virnet/_wire.pyx
inc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
ext=$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
libfuzzer=$(python -c 'import atheris.core_with_libfuzzer as m; print(m.__file__)')
clang -shared -fPIC -O1 -g \
    -fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp \
    -I"$inc" -Ipyx/virnet "$out/_wire.c" -o "$out/virnet/_wire$ext" "$libfuzzer"
echo "coverage build in $out (PYTHONPATH=$out)"
