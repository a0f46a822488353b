#!/usr/bin/env bash
# mamba-ssm's sources for the SSD peer rows of the linear suite (subquad/bench/peers.py, mamba_ssd): PyPI has
# only its sdist, whose CUDA extensions need a compiler; its Triton SSD needs none. Run in the project root on
# this machine; makes .peers3/mamba_ssm (ignored by git, ~1 MB) to carry to the device, where
#   export PYTHONPATH=$PWD/.peers3:$PYTHONPATH
# puts it on the path (the peer imports the Triton SSD without the package's __init__).
set -euo pipefail
version=${1:-2.3.2.post1}
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.peers3/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.peers3/" >> .git/info/exclude; }
url=$(curl -fsS "https://pypi.org/pypi/mamba-ssm/json" | python3 -c "import json, sys
files = json.load(sys.stdin)['releases']['$version']
print([f['url'] for f in files if f['packagetype'] == 'sdist'][0])")
tmp=$(mktemp -d)
curl -fsSL -o "$tmp/mamba.tar.gz" "$url"
tar xzf "$tmp/mamba.tar.gz" -C "$tmp"
rm -rf .peers3 && mkdir -p .peers3
cp -r "$tmp/mamba_ssm-$version/mamba_ssm" .peers3/
cp "$tmp/mamba_ssm-$version/LICENSE" .peers3/mamba_ssm/
rm -rf "$tmp"
du -sh .peers3
