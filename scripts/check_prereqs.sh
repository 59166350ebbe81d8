#!/usr/bin/env bash
# Say clearly what is missing before a long install starts.
set -u
py=${1:-python3}
ok=1
if ! command -v "$py" >/dev/null 2>&1; then
  echo "lookalike needs Python >= 3.11: '$py' was not found (set PYTHON=/path/to/python3.11)" >&2; ok=0
elif ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "lookalike needs Python >= 3.11; $py is $("$py" -V 2>&1) (set PYTHON=/path/to/python3.11)" >&2; ok=0
fi
if ! command -v java >/dev/null 2>&1; then
  echo "lookalike needs Java 17 for Spark: 'java' was not found (Debian: apt-get install openjdk-17-jre-headless)" >&2; ok=0
else
  major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  if [ -z "$major" ] || [ "$major" -lt 17 ]; then
    echo "lookalike needs Java 17 or newer for Spark; found version '${major:-unknown}'" >&2; ok=0
  fi
fi
[ "$ok" = 1 ] || exit 1
