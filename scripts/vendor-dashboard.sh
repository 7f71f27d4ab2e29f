#!/usr/bin/env bash
# Re-fetches the dashboard's vendored charting library (Chart.js, MIT) from
# npm at the pinned version and checks its digest. The file is committed
# (the binary embeds it; no network at build time); run this to upgrade,
# then update VERSION and SHA256 below.
set -euo pipefail
VERSION=4.6.1
SHA256=87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "chart.js@$VERSION" >/dev/null && tar xzf "chart.js-$VERSION.tgz")
echo "$SHA256  $tmp/package/dist/chart.umd.min.js" | sha256sum -c -
cp "$tmp/package/dist/chart.umd.min.js" serve/src/http/dashboard/vendor/chart.umd.min.js
cp "$tmp/package/LICENSE.md" serve/src/http/dashboard/vendor/chart.js.LICENSE.md
echo "vendored chart.js $VERSION"
