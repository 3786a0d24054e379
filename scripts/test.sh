#!/usr/bin/env bash
# Installs everything the tests need (Python extras, Prometheus, Alertmanager) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=0
for bin in prometheus promtool amtool prometheus-alertmanager; do
  command -v "$bin" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus prometheus-alertmanager
  else
    echo "prometheus / prometheus-alertmanager missing and not root: integration tests will fail under CI=true" >&2
  fi
fi
python -m pip install -q -e '.[test]'
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
