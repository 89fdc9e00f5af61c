#!/usr/bin/env bash
# Downloads Debian packages from the `sid` suite and unpacks them (dpkg -x) into DEST, without touching the
# machine's apt state: a private sources list whose URI is read from the machine's own apt configuration.
# Used at build time for the ONNX Runtime 1.23.2 C headers (libonnxruntime-dev) and the XRT 2.25 headers
# (libxrt-dev). Nothing fetched here is ever committed.
#   usage: fetch-debian-headers.sh DEST PACKAGE...
#   env:   XDNA_DEBIAN_URI  overrides the mirror URI (e.g. http://deb.debian.org/debian)
set -euo pipefail
dest=$1; shift
command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
  echo "fetch-debian-headers: apt-get/dpkg not found; pass -DONNXRUNTIME_INCLUDE_DIR=... (and -DXRT_INCLUDE_DIR=...) instead" >&2
  exit 2
}
uri=${XDNA_DEBIAN_URI:-}
if [ -z "$uri" ]; then
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
    [ -n "$uri" ] && break
  done
fi
if [ -z "$uri" ]; then
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/ && $i !~ /security/) { print $i; exit } }')
fi
[ -n "$uri" ] || { echo "fetch-debian-headers: no Debian mirror URI in /etc/apt; set XDNA_DEBIAN_URI" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$dest"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
opts=""; [ -f "$keyring" ] && opts="[signed-by=$keyring]"
echo "deb $opts $uri sid main" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Dir::State::status=/dev/null
          -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq)
echo "fetch-debian-headers: $* from $uri (sid)" >&2
apt-get "${apt_opts[@]}" update >&2
(cd "$work" && apt-get "${apt_opts[@]}" download "$@" >&2)
for deb in "$work"/*.deb; do dpkg -x "$deb" "$dest"; done
