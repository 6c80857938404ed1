#!/usr/bin/env bash
# Builds haproxy-azure-discovery.pyz: haproxy_azure_discovery.py plus the Azure SDK pinned in
# requirements.lock, in one file that runs on the system python3 3.10-3.13 of any glibc x86_64 Linux
# (glibc 2.17 or newer):  python3 haproxy-azure-discovery.pyz -c config.json
#
#   ./build_pyz.sh [-o OUTPUT | OUTPUT]     default: ./haproxy-azure-discovery.pyz
#   PEX=/path/to/pex ./build_pyz.sh         use that pex (same version!) instead of build/venv's
#
# Why pex and not zipapp: cryptography and cffi are compiled, and zipimport cannot load them. A pex
# unpacks its dependencies on first start into $PEX_ROOT (default ~/.pex; the systemd unit points it
# at its CacheDirectory), and its entry point calls sys.exit(main()), so exit codes survive.
# Needs PyPI (or the index pip is configured for) the first time; later builds come from the cache.
set -euo pipefail

out=haproxy-azure-discovery.pyz
case "${1:-}" in
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -o) out=${2:?-o needs a path} ;;
    ?*) out=$1 ;;
esac
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")"

version=$(python3 -c 'import haproxy_azure_discovery as m; print(m.__version__)')

# The pex version is part of the output's bytes, so it is pinned (also in requirements-test.txt).
pex_version=2.105.2
pex=${PEX:-build/venv/bin/pex}
if [ -z "${PEX:-}" ] && [ ! -x "$pex" ]; then
    python3 -m venv build/venv      # Debian/Ubuntu: needs the python3-venv package
    build/venv/bin/python -m pip install -q --disable-pip-version-check "pex==$pex_version"
fi

# requirements.lock must pin, for every package, a version that installs on all four Pythons, or one
# line per range with a marker (`pkg==X; python_version < "3.11"`): pex resolves each target apart.
# One wheel set per target CPython, for manylinux2014 (glibc 2.17+): cffi and charset-normalizer have
# a wheel per version, cryptography abi3 ones. The full version (3.X.0) lets pex evaluate
# cryptography's `python_full_version` marker. --no-build: wheels only, no compiler, no sdists.
# --pip-version: a fixed pip for the resolve (pex's default follows the newest it knows, and its
# vendored one is 20.3); --venv: the first start builds a venv in PEX_ROOT and execs into it (same
# PID, so sd_notify and $MAINPID hold), later starts go straight there (about 0.5 s instead of 1.2 s).
# Reproducible by pex's defaults: no .pyc (--no-compile), fixed 1980 timestamps (--no-use-system-time).
platforms=()
for minor in 10 11 12 13; do
    platforms+=(--platform "manylinux2014_x86_64-cp-3.$minor.0-cp3$minor")
done
"$pex" -r requirements.lock -M haproxy_azure_discovery -e haproxy_azure_discovery:main \
    "${platforms[@]}" --no-build --pip-version 25.2 --venv \
    --no-compile --no-use-system-time --python-shebang '/usr/bin/env python3' -o "$out"

# What went in, and how big: two builds of one commit give the same list and the same sha256.
python3 - "$out" <<'EOF'
import json, sys, zipfile
info = json.loads(zipfile.ZipFile(sys.argv[1]).read("PEX-INFO"))
print("\n".join(f"  {name}" for name in sorted(info["distributions"])))
EOF
size=$(stat -c %s "$out")
echo "haproxy-azure-discovery $version: $out, $((size / 1024 / 1024)) MiB ($size bytes)," \
     "sha256 $(sha256sum "$out" | cut -d' ' -f1)"
