#!/usr/bin/env bash
# Run a job from jobs/ on any Spark master, shipping the lookalike package and conf/.
#
#   ./spark-submit.sh [--master URL] [other spark-submit options] JOB [JOB ARGS...]
#   ./spark-submit.sh --master spark://10.0.0.5:7077 run /archive --home /data/lookalike
#
# JOB is a file name in jobs/ without .py (run, recluster). The master defaults to
# $SPARK_MASTER or local[*]. Executors need the same Python dependencies as the driver:
# the same venv path on every node, or a packed venv (--archives) with PYSPARK_PYTHON set.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
submit=${SPARK_SUBMIT:-}
if [ -z "$submit" ]; then
  if [ -x "$here/.venv/bin/spark-submit" ]; then submit="$here/.venv/bin/spark-submit"; else submit=spark-submit; fi
fi
python=${PYSPARK_PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3

opts=()
master=${SPARK_MASTER:-local[*]}
while [ $# -gt 0 ]; do
  case "$1" in
    --master) master=$2; shift 2 ;;
    --verbose|--supervise) opts+=("$1"); shift ;;  # spark-submit's options that take no value
    --*) opts+=("$1" "$2"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--master URL] JOB [ARGS...]  (jobs: $(cd "$here/jobs" && ls *.py | sed 's/\.py$//' | tr '\n' ' '))" >&2; exit 2; }
job="$here/jobs/$1.py"; shift
[ -f "$job" ] || { echo "no such job: $job" >&2; exit 2; }

# The package travels as a zip on the executors' Python path; conf/ travels with --files.
build="$here/build"
mkdir -p "$build"
(cd "$here/lib" && "$python" - <<'PY'
import os, pathlib, zipfile
out = pathlib.Path("../build/lookalike.zip")
tmp = out.with_suffix(f".{os.getpid()}.tmp")  # two jobs submitted at once must not share it
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
    for p in sorted(pathlib.Path("lookalike").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            z.write(p)
tmp.replace(out)
PY
)
export PYSPARK_PYTHON="$python" PYSPARK_DRIVER_PYTHON="$python"
export LOOKALIKE_DEFAULTS="$here/conf/lookalike.toml" LOOKALIKE_SPARK_MASTER="$master"
# The driver JVM is spark-submit's own: without this it logs every INFO line of Spark's start.
exec "$submit" --master "$master" \
  --conf spark.ui.showConsoleProgress=false \
  --conf "spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=file://$here/conf/log4j2.properties" \
  --conf "spark.executorEnv.PYSPARK_PYTHON=$python" \
  --py-files "$build/lookalike.zip" --files "$here/conf/lookalike.toml" \
  "${opts[@]}" "$job" "$@"
