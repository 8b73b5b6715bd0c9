#!/usr/bin/env bash
# Install Debian's chromium and its driver for the playground test (tests marked `browser`),
# when apt is available and we may use it. Best effort: CI calls this with `|| true`, and the
# test skips itself where the browser is missing.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-browser: no apt-get; the browser test will be skipped" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo -n"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
