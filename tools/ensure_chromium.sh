#!/usr/bin/env bash
# Find a Chromium for plotly's static (PNG) export; install Debian's where we can (root + apt-get).
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's chromium for static PNG export (about 30 s) ..."
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/tmp/nc-chromium.log 2>&1; then
    exit 0
  fi
  echo "warning: apt-get could not install chromium (see /tmp/nc-chromium.log); PNG export will be skipped."
  exit 0
fi
echo "note: no Chromium found, so figures are written as HTML only; for PNGs install one (e.g. 'sudo apt-get install chromium')."
exit 0
