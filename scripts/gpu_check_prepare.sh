#!/usr/bin/env bash
# Fill the wheelhouse that benchmarks/gpu_check.py installs from on a GPU machine with NO internet.
# Run it on a machine with internet, then copy the folder to the GPU machine along with the repository
# (it is .gpu-check-wheels/ in the repository by default, where gpu_check.py looks for it).
#
#   bash scripts/gpu_check_prepare.sh            # -> .gpu-check-wheels/ (git-ignored)
#   GPU_CHECK_WHEELS=dir              where the wheelhouse goes (default .gpu-check-wheels in the repo)
#   GPU_CHECK_PY_VERSIONS="3.11 3.12 3.13"   CPython versions to fetch compiled wheels for
#   GPU_CHECK_WITH_TENSORBOARD=0      leave tensorboard out (gpu_check.py then runs with --tensorboard false)
#   GPU_CHECK_WITH_MPI4PY=1           add the mpi4py sdist (only useful where the GPU machine has MPI)
#
# What goes in, all at the exact versions of requirements/lock.txt, each checked against the lock's
# sha256 (pip --require-hashes), each fetched with --no-deps (the closure is computed here, from the lock's
# "# via" lines):
#   - the Horovod sdist (built there by gpu_check.py);
#   - what hpctrain's PyTorch path and Horovod import at run time, minus what torch itself brings:
#     transformers, tokenizers, huggingface-hub (+ its needs), tensorboard, tqdm, psutil, pyyaml,
#     cloudpickle, cffi, packaging, and everything the lock says those need.
# Left out, on purpose:
#   - torch, numpy, pillow, setuptools, wheel: the GPU machine's Python holds them (its torch must not be
#     replaced: it is the CUDA build), and numpy/pillow wheels are 5-17 MB per Python version.
#   - tensorboard's server side (grpcio, werkzeug, markdown, tensorboard-data-server, ~25 MB over three
#     Python versions): hpctrain only writes event files with tensorboard.summary.Writer (numpy + protobuf).
#   - mpi4py: only the pipeline and multi-rank DDP rendezvous import it; a one-GPU check needs neither, and
#     its sdist only builds where MPI headers exist (GPU_CHECK_WITH_MPI4PY=1 adds it anyway).
#   - TensorFlow and keras-hub: the GPU check runs the PyTorch engine only.
# Python versions: hpctrain needs Python >= 3.11 (tomllib; setup.cfg python_requires), so 3.10 is not
# fetched; compiled wheels come for 3.11, 3.12 and 3.13, whichever the GPU machine's Python is. Most
# compiled packages here ship one abi3 wheel (tokenizers, hf-xet, safetensors, psutil, protobuf), so the
# extra versions cost little. Pure-python wheels are fetched once.
# The folder is kept small, so that it travels easily with the repository (~1.5 MB) to the GPU machine:
# the script prints the size and fails above GPU_CHECK_MAX_MB (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOCK=$ROOT/requirements/lock.txt
W=${GPU_CHECK_WHEELS:-$ROOT/.gpu-check-wheels}
PY_VERSIONS=${GPU_CHECK_PY_VERSIONS:-3.11 3.12 3.13}
WITH_TB=${GPU_CHECK_WITH_TENSORBOARD:-1}
WITH_MPI4PY=${GPU_CHECK_WITH_MPI4PY:-0}
MAX_MB=${GPU_CHECK_MAX_MB:-60}
if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
PIP=("$PY" -m pip download -q --disable-pip-version-check --no-deps --require-hashes -d "$W")

step=""
trap 'echo "gpu_check_prepare.sh: FAILED at step: ${step}" >&2' ERR
say() { step="$1"; echo "== prepare: $1"; }

mkdir -p "$W"
rm -f "$W"/*.whl "$W"/*.tar.gz "$W"/manifest.tsv  # a rerun with other settings leaves no stale files
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-prepare.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

say "closure of the needed packages from $LOCK"
roots="transformers tokenizers huggingface-hub tqdm psutil pyyaml cloudpickle cffi packaging"
[ "$WITH_TB" = 0 ] || roots="$roots tensorboard"
# Writes $tmp/wheels.txt (lock blocks with hashes: name==version + --hash lines) and $tmp/names.txt.
"$PY" - "$LOCK" "$tmp" "$roots" <<'EOF'
import re, sys
lock, tmp, roots = sys.argv[1], sys.argv[2], set(sys.argv[3].split())
# Present on the GPU machine, or not needed by what hpctrain runs there (see the script's header).
skip = {"torch", "numpy", "pillow", "setuptools", "wheel", "horovod", "mpi4py", "tensorflow",
        "grpcio", "werkzeug", "markdown", "tensorboard-data-server"}
blocks, via, cur, in_via = {}, {}, None, False
for line in open(lock):
    if re.match(r"^[A-Za-z0-9]", line):
        cur = line.split("==", 1)[0].strip().lower()
        blocks[cur], via[cur], in_via = [line], set(), False
        continue
    if cur is None:
        continue
    s = line.strip()
    if s.startswith("--hash") or s.endswith("\\"):
        blocks[cur].append(line)
    m = re.match(r"# via\s*(\S*)", s)
    if m:
        in_via = True
        if m.group(1):
            via[cur].add(m.group(1).lower())
        continue
    m = re.match(r"#\s+(\S+)", s)
    if in_via and m:
        via[cur].add(m.group(1).lower())
missing = roots - blocks.keys()
if missing:
    sys.exit(f"not in the lock: {sorted(missing)}")
need, changed = set(roots), True
while changed:  # add every locked package that something already needed requires ("# via X")
    changed = False
    for q, users in via.items():
        if q not in need and q not in skip and users & need:
            need.add(q)
            changed = True
with open(f"{tmp}/wheels.txt", "w") as f:
    for n in sorted(need):
        text = "".join(blocks[n]).rstrip().rstrip("\\").rstrip()
        f.write(text + "\n")
with open(f"{tmp}/names.txt", "w") as f:
    f.write("\n".join(sorted(need)) + "\n")
EOF
echo "   $(wc -l < "$tmp/names.txt") packages: $(tr '\n' ' ' < "$tmp/names.txt")"
awk '/^[^ #]/ { skip = ($1 !~ /^horovod==/) } !skip' "$LOCK" | sed '$ s/ *\\$//' > "$tmp/horovod.txt"

say "Horovod sdist (lock version, hash-checked)"
# pip prepares an sdist's metadata even with --no-deps: no build isolation, so no setuptools download.
"${PIP[@]}" --no-binary :all: --no-build-isolation -r "$tmp/horovod.txt"
if [ "$WITH_MPI4PY" = 1 ]; then
  awk '/^[^ #]/ { skip = ($1 !~ /^mpi4py==/) } !skip' "$LOCK" | sed '$ s/ *\\$//' > "$tmp/mpi4py.txt"
  "${PIP[@]}" --no-binary :all: --no-build-isolation -r "$tmp/mpi4py.txt"
fi

platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for v in $PY_VERSIONS; do
  say "wheels for CPython $v, manylinux x86_64 (pure-python ones once)"
  "${PIP[@]}" --only-binary=:all: --implementation cp --python-version "$v" "${platforms[@]}" -r "$tmp/wheels.txt"
done

say "manifest (dist, version, import name) for gpu_check.py"
# One line per package: what gpu_check.py imports to decide whether the GPU machine already has it.
"$PY" - "$W" "$tmp/names.txt" <<'EOF'
import re, sys, zipfile
from pathlib import Path
w, names = Path(sys.argv[1]), Path(sys.argv[2]).read_text().split()
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
rows = {}
for whl in sorted(w.glob("*.whl")):
    dist, version = whl.name.split("-")[:2]
    if norm(dist) in rows:
        continue
    with zipfile.ZipFile(whl) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        paths = [line.split(",")[0] for line in z.read(record).decode().splitlines()]
    tops = sorted({p.split("/")[0] for p in paths if not re.search(r"\.(dist-info|data)(/|$)", p.split("/")[0])})
    mods = []
    for t in tops:
        if t.endswith(".py"):
            mods.append(t[:-3])
        elif f"{t}/__init__.py" in paths:
            mods.append(t)
        else:  # a namespace package (protobuf's google/): its first regular package
            subs = sorted(p.split("/")[1] for p in paths if p.count("/") == 2 and p.startswith(t + "/")
                          and p.endswith("/__init__.py"))
            if subs:
                mods.append(f"{t}.{subs[0]}")
    mods = [m for m in mods if not m.startswith("_")] or mods
    best = next((m for m in mods if norm(m) == norm(dist)), mods[0] if mods else norm(dist))
    rows[norm(dist)] = (dist, version, best)
missing = [n for n in names if norm(n) not in rows]
if missing:
    sys.exit(f"no wheel downloaded for: {missing}")
with open(w / "manifest.tsv", "w") as f:
    f.write("# dist\tversion\timport (written by scripts/gpu_check_prepare.sh; read by benchmarks/gpu_check.py)\n")
    for n in names:
        f.write("\t".join(rows[norm(n)]) + "\n")
EOF

say "size"
mb=$(du -sm "$W" | cut -f1)
echo "   $W: $(find "$W" -maxdepth 1 -type f | wc -l) files, $(du -sh "$W" | cut -f1) (limit ${MAX_MB} MB)"
if [ "$mb" -gt "$MAX_MB" ]; then
  echo "gpu_check_prepare.sh: $W is $mb MB, over $MAX_MB: rerun with GPU_CHECK_WITH_TENSORBOARD=0 or fewer GPU_CHECK_PY_VERSIONS" >&2
  exit 1
fi
echo "== prepare: done. Copy the repository with $W to the GPU machine and run 'python3 benchmarks/gpu_check.py' there"
