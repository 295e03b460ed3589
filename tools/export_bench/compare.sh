#!/usr/bin/env bash
# The GGUF export figures in BENCHMARKS.md ("GGUF export tensor by tensor"): `lorapipe export` of one run directory
# with an old commit's export.py and this checkout's, alternated, each file's sha256 compared (one file on disk at a
# time). From the project root, in the venv:
#   python tools/export_bench/mkrun.py /tmp/ex8 llama3-8b bfloat16      # a run whose merged/ has that shape
#   OLD=d179ab7 TYPES="f16 q8_0" bash tools/export_bench/compare.sh /tmp/ex8/runs/llama3-8b
set -u
R=$(pwd); RUN=$1; OLD=${OLD:-d179ab7}
rm -rf /tmp/export-old && mkdir -p /tmp/export-old && cp -r src/lorapipe /tmp/export-old/ \
  && git show $OLD:src/lorapipe/export.py > /tmp/export-old/lorapipe/export.py \
  && git show $OLD:src/lorapipe/cli.py > /tmp/export-old/lorapipe/cli.py
for t in ${TYPES:-f16 q8_0}; do
  for code in ${CODES:-old new}; do
    src=$R/src; [ $code = old ] && src=/tmp/export-old
    (cd "$(dirname $RUN)" && PYTHONPATH=$src python $R/tools/export_bench/measure.py export-$t-$code -- \
      python -m lorapipe export $RUN --outtype $t --gguf-pre gpt2 --no-check 2>&1 | grep "MEAS\|rror")
    f=$RUN/export/$(basename $RUN)-$t.gguf
    echo "$code $t sha256 $(sha256sum $f | cut -c1-16) bytes $(stat -c %s $f)"; rm -f $f
  done
done
