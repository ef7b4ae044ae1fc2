#!/usr/bin/env bash
# One chunk of a fuzz campaign: a harness on one core, with a persistent corpus.
#
#   fuzz/campaign.sh HARNESS CORE RUNS [SECONDS]
#     HARNESS  frames | xdr | core | daemon | client
#     CORE     compiled | cov (compiled, coverage build from build_cov.sh) | pure
#     RUNS     inputs to run; SECONDS caps the chunk (default 540)
#
# The corpus grows in fuzz/corpus/HARNESS-CORE (seeded from fuzz/seeds/HARNESS, made by
# make_seeds.py); the log goes to fuzz/logs/HARNESS-CORE-<time>.log and the last lines,
# with libFuzzer's exec count, to stdout.  Run it under the shared benchmark lock:
#   flock /tmp/virnet-bench.lock fuzz/campaign.sh xdr compiled 3000000
set -euo pipefail
cd "$(dirname "$0")/.."
harness=$1 core=$2 runs=$3 seconds=${4:-540}
src="$PWD/src"
case $core in
  compiled) export PYTHONPATH="$src"; unset VIRNET_NO_EXTENSIONS ;;
  cov) export PYTHONPATH="$PWD/fuzz/.covbuild"; unset VIRNET_NO_EXTENSIONS
       [ -d fuzz/.covbuild ] || fuzz/build_cov.sh ;;
  pure) export PYTHONPATH="$src" VIRNET_NO_EXTENSIONS=1 ;;
  *) echo "unknown core $core" >&2; exit 2 ;;
esac
case $harness in
  frames|daemon|client) max_len=16384 ;;
  *) max_len=4096 ;;
esac
[ -d fuzz/seeds/"$harness" ] || python fuzz/make_seeds.py >/dev/null
corpus="fuzz/corpus/$harness-$core"
mkdir -p "$corpus" fuzz/logs fuzz/artifacts
log="fuzz/logs/$harness-$core-$(date +%Y%m%d-%H%M%S).log"
rc=0
python "fuzz/fuzz_$harness.py" -runs="$runs" -max_total_time="$seconds" -max_len="$max_len" \
    -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
    -artifact_prefix=fuzz/artifacts/ "$corpus" "fuzz/seeds/$harness" >"$log" 2>&1 || rc=$?
grep -E "^fuzz |INITED|^#[0-9]+ +DONE|^Done|stat::number_of_executed_units|stat::peak_rss|ERROR|Uncaught" "$log" \
    | sed "s|^|$harness/$core: |"
echo "$harness/$core: exit $rc, log $log"
exit $rc
