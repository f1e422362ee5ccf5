#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or fail with a clear message.
# Why: on this machine kind pyenv has 3.12.1 installed but 3.11 is the default `python3`.
set -euo pipefail

is_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
candidates+=(python3.12 python3.13 python3)
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in "$root"/versions/3.12.* "$root"/versions/3.13.*; do
    [ -x "$v/bin/python" ] && candidates+=("$v/bin/python")
  done
fi
for c in "${candidates[@]}"; do
  p=$(command -v "$c" 2>/dev/null || true)
  [ -n "$p" ] && is_ok "$p" && { echo "$p"; exit 0; }
done
echo "error: no Python >= 3.12 found (tried: ${candidates[*]}); set PYTHON=/path/to/python3.12" >&2
exit 1
