#!/bin/sh
# Vendor onnxruntime-web's WebAssembly runtime into the page's static files, from the npm registry.
#   scripts/vendor_onnxruntime_web.sh            # the pinned version below
#   scripts/vendor_onnxruntime_web.sh 1.31.0     # another one (then run the tests: the browser parity test)
# Only this script needs npm; pneumoscan serves the files itself (no CDN) and needs no Node at run time.
set -eu
VERSION="${1:-1.30.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="$ROOT/src/pneumoscan/apps/static/vendor/onnxruntime-web"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "onnxruntime-web@$VERSION" >/dev/null && tar xzf "onnxruntime-web-$VERSION.tgz")
FILES="ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm"
rm -rf "$TARGET" && mkdir -p "$TARGET"
for f in $FILES; do cp "$WORK/package/dist/$f" "$TARGET/$f"; done
gzip -9 -n -k "$TARGET/ort-wasm-simd-threaded.wasm"  # served as is to browsers that accept gzip
cat > "$TARGET/LICENSE" <<'LICENSE'
onnxruntime-web (https://github.com/microsoft/onnxruntime), MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
LICENSE
TARBALL_SHA="$(sha256sum "$WORK/onnxruntime-web-$VERSION.tgz" | cut -d' ' -f1)"
{
  printf '{\n  "package": "onnxruntime-web",\n  "version": "%s",\n  "tarball_sha256": "%s",\n  "files": {\n' "$VERSION" "$TARBALL_SHA"
  sep=""
  for f in $FILES ort-wasm-simd-threaded.wasm.gz; do printf '%s    "%s": "%s"' "$sep" "$f" "$(sha256sum "$TARGET/$f" | cut -d' ' -f1)"; sep=",
"; done
  printf '\n  }\n}\n'
} > "$TARGET/vendor.json"
echo "onnxruntime-web $VERSION vendored into $TARGET"
