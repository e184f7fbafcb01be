#!/usr/bin/env bash
# Re-creates the demo page's built assets in assets/demo/ (app.js, index.html, style.css)
# from web/: installs the pinned npm packages (npm ci, from web/package-lock.json), bundles
# and minifies web/src/main.js with esbuild, and copies the HTML and CSS. The output is
# committed and embedded in the binary (src/demo.rs), so building or running easel needs
# no Node; run this after changing anything under web/, then rebuild the binary.
set -euo pipefail
cd "$(dirname "$0")/../web"

npm ci --no-audit --no-fund --loglevel=error
mkdir -p ../assets/demo
npm run --silent build
ls -l ../assets/demo
