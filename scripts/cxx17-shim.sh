#!/usr/bin/env bash
# Horovod 0.28.1 pins -std=c++14 for its PyTorch extension, but PyTorch >= 2.1 needs C++17
# (horovod#3996; the fix #3998 was never released). Rewrite the flag and call the real compiler.
args=()
for a in "$@"; do
  if [ "$a" = "-std=c++14" ]; then args+=("-std=c++17"); else args+=("$a"); fi
done
exec "${HPCTRAIN_REAL_CXX:-c++}" "${args[@]}"
