#!/usr/bin/env bash
# Installs the peer quantizers the bench compares squash with (the `[bench]` extra) into .venv, without ever
# touching torch: every install runs with a constraint that pins the torch already there (torch==2.13.0, the
# CPU build on this machine's disk); an unpinned peer would pull a multi-GB CUDA torch.
#
#     bash bench/setup.sh            # idempotent: a peer already installed at its version is not reinstalled
#
# The peers and their exact versions are the `bench` list under [project.optional-dependencies] in
# pyproject.toml (torchao 0.18.0 is the newest on the index and imports against torch 2.13; its CUDA-only
# extensions print "Failed to load ..." on import, harmlessly).
#
# Prints one line per peer (installed / already there / FAILED with pip's last line) and exits 0 even when a
# peer fails: the bench records a missing peer with its import error rather than dropping it.
# llama-cpp-python builds llama.cpp from source (about 13 minutes on 2 cores) unless pip has the wheel cached.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "no $PY: run 'make install' first" >&2
    exit 1
fi
TORCH=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])') || { echo "torch does not import in $PY" >&2; exit 1; }
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"

# The peers and their versions: the `bench` extra in pyproject.toml (name==version each).
mapfile -t PEERS < <("$PY" - <<'PYEOF'
import re, tomllib
imports = {"hqq": "hqq", "optimum-quanto": "optimum.quanto", "torchao": "torchao", "bitsandbytes": "bitsandbytes",
           "llama-cpp-python": "llama_cpp"}
with open("pyproject.toml", "rb") as f:
    for req in tomllib.load(f)["project"]["optional-dependencies"]["bench"]:
        name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", req.strip()).groups()
        print(name, version, imports.get(name, name.replace("-", "_")))
PYEOF
)
if [ "${#PEERS[@]}" -eq 0 ]; then
    echo "no [project.optional-dependencies] bench list in pyproject.toml" >&2
    exit 1
fi
ok=(); failed=()
for line in "${PEERS[@]}"; do
    read -r pkg ver mod <<< "$line"
    have=$("$PY" -m pip show "$pkg" 2>/dev/null | awk '/^Version:/ {print $2}')
    if [ "$have" = "$ver" ]; then
        echo "= $pkg $ver already installed"
    else
        echo "+ installing $pkg==$ver${have:+ (have $have)} ..."
        log=$(mktemp)
        if ! "$PY" -m pip install -q -c "$CONSTRAINTS" "$pkg==$ver" > "$log" 2>&1; then
            failed+=("$pkg==$ver: pip: $(grep -v '^\s*$' "$log" | tail -n 1)")
            rm -f "$log"
            continue
        fi
        rm -f "$log"
    fi
    # Installed is not enough: the bench needs the import to work against this torch.
    if err=$("$PY" -c "import $mod" 2>&1); then
        ok+=("$pkg==$ver")
    else
        failed+=("$pkg==$ver: import $mod: $(echo "$err" | grep -v '^\s*$' | tail -n 1)")
    fi
done
now=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$now" != "$TORCH" ]; then
    echo "ERROR: torch changed from $TORCH to $now; reinstall it: $PY -m pip install torch==$TORCH" >&2
    exit 1
fi
echo
echo "torch $now untouched"
for p in "${ok[@]}"; do echo "ok      $p"; done
for p in "${failed[@]+"${failed[@]}"}"; do echo "FAILED  $p"; done
exit 0
