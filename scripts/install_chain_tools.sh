#!/usr/bin/env bash
# Install the chain tools into .tools/ (gitignored): Foundry's anvil 1.7.1 and solc-js 0.8.37,
# both from npm. Idempotent: does nothing when both are already there. Needs node + npm.
#   .tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
#   .tools/node_modules/solc/
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
ANVIL_VERSION=1.7.1
SOLC_VERSION=0.8.37
anvil="$TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
solc_pkg="$TOOLS/node_modules/solc/package.json"
have_solc() { [ -f "$solc_pkg" ] && grep -q "\"version\": \"$SOLC_VERSION\"" "$solc_pkg"; }
if [ -x "$anvil" ] && have_solc; then
  echo "chain tools: present in $TOOLS"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "chain tools: npm not found; install Node.js 20+ (with npm) to get anvil and solc-js" >&2
  exit 1
fi
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) anvil_pkg="@foundry-rs/anvil-linux-amd64@$ANVIL_VERSION" ;;
  Linux-aarch64) anvil_pkg="@foundry-rs/anvil-linux-arm64@$ANVIL_VERSION" ;;
  Darwin-arm64) anvil_pkg="@foundry-rs/anvil-darwin-arm64@$ANVIL_VERSION" ;;
  Darwin-x86_64) anvil_pkg="@foundry-rs/anvil-darwin-amd64@$ANVIL_VERSION" ;;
  *) echo "chain tools: no anvil package for $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac
mkdir -p "$TOOLS"
[ -f "$TOOLS/package.json" ] || echo '{"name": "fedledger-tools", "private": true}' > "$TOOLS/package.json"
# one npm call for both, so neither prunes the other. Run inside $TOOLS rather than with
# --prefix: --prefix also moves npm's global config ($PREFIX/etc/npmrc), which is where a
# machine's CA bundle (cafile) for a TLS-intercepting proxy is usually configured.
(cd "$TOOLS" && npm install --no-save --ignore-scripts --no-audit --no-fund "$anvil_pkg" "solc@$SOLC_VERSION" >/dev/null)
found=$(ls "$TOOLS"/node_modules/@foundry-rs/anvil-*/bin/anvil 2>/dev/null | head -1)
[ -n "$found" ] && chmod +x "$found"
"$found" --version | head -1
echo "chain tools: solc-js $SOLC_VERSION and anvil $ANVIL_VERSION in $TOOLS"
