#!/bin/sh
# Usage: benchmarks/eval_hmt_mix.sh [CHECKPOINT]   (default: the released hmt-smollm2-135m-mix; needs
# apt-get install diatheke sword-text-web python3.11-doc for the bible-web and python-docs corpora)
# Held-out evaluation of the mixed-corpus HMT: each corpus's test split, 3 documents x 4096 tokens.
M=${1:-hmt-smollm2-135m-mix}
OUT=benchmarks/results/hmt-mix-eval
for src in shakespeare bible-web python-docs; do
  OMP_NUM_THREADS=2 .venv/bin/hiermem eval --checkpoint "$M" --source $src --documents 3 --max-tokens 4096 \
    --methods model sensory chunks sliding full --tasks perplexity --output $OUT/$src || exit 1
done
# eviction policies with a bank smaller than the documents (N = 4 slots over 16 segments)
OMP_NUM_THREADS=2 .venv/bin/hiermem eval --checkpoint "$M" --source shakespeare --documents 3 --max-tokens 4096 \
  --methods hmt-fifo hmt-attention --cache-size 4 --tasks perplexity --output $OUT/eviction-n4
