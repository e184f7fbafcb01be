#!/usr/bin/env bash
# Re-creates the demo page's bundle, assets/demo/app.js, from web/: installs the pinned npm
# packages (npm ci, from web/package-lock.json) and bundles and minifies web/src/main.js
# with esbuild. The bundle is committed and embedded in the binary with web/index.html and
# web/style.css (src/demo.rs), so building or running easel needs no Node; run this after
# changing web/src, then rebuild the binary.
set -euo pipefail
cd "$(dirname "$0")/../web"

npm ci --no-audit --no-fund --loglevel=error
mkdir -p ../assets/demo
npm run --silent build
ls -l ../assets/demo
