"""Every definition in containers/ parses (tests/containers/deffile.py, Apptainer's rules) and has what an HPC
image needs; the parser itself refuses what Apptainer refuses."""
import re
import subprocess

import pytest

from tests.containers.conftest import CUDA_DEFINITION, DEFINITION
from tests.containers.deffile import DefinitionError, load, parse, render
from tests.launch import ROOT

DEFINITIONS = sorted((ROOT / "containers").glob("*.def"))
REQUIRED = {"arguments", "files", "post", "environment", "runscript", "test", "labels", "help"}
VERSION_LABELS = ("python", "torch", "tensorflow", "horovod", "openmpi", "pmix")


def test_both_definitions_exist():
    assert [p.name for p in DEFINITIONS] == ["hpctrain-cuda.def", "hpctrain.def"]


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda p: p.name)
def test_definition_parses_with_required_sections(path):
    d = load(path)
    assert d.header["bootstrap"] == "docker" and d.header["from"]
    assert REQUIRED <= set(d.sections), REQUIRED - set(d.sections)
    assert d.arguments["FRAMEWORKS"] == "torch"  # the framework list is a build argument, PyTorch by default
    # %files: the project, from the repository root, into /opt/hpctrain; every source exists.
    for src, dst in d.files:
        assert (ROOT / src).exists(), src
        assert dst == f"/opt/hpctrain/{src}"
    assert {"hpctrain", "scripts", "requirements", "setup.cfg", "pyproject.toml"} <= {s for s, _ in d.files}
    # The one installer, with the framework argument; no second recipe of pip/apt lines.
    post = d.body("post")
    assert "bash /opt/hpctrain/scripts/install.sh" in post and 'HPCTRAIN_FRAMEWORKS="torch"' in post
    assert "pip install" not in post and "apt-get install" not in post
    # Versions recorded at build time as labels, next to the static ones.
    for name in VERSION_LABELS:
        assert f"org.hpctrain.{name} " in post, name
    assert d.labels["org.opencontainers.image.title"] == "hpctrain"
    assert "PATH=/opt/venv/bin:$PATH" in d.body("environment")
    assert 'exec python -m "hpctrain.$entry" "$@"' in d.body("runscript")
    test = d.body("test")
    assert "horovodrun --check-build" in test and "mpirun -np " in test and "hvd.allreduce" in test


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("section", ["post", "environment", "runscript", "test"])
def test_scriptlets_are_valid_sh(path, section):
    # Apptainer runs them with /bin/sh (dash on Debian/Ubuntu): a bash-only line would fail only at build time.
    body = load(path, {"FRAMEWORKS": "torch,tf"}).body(section)
    p = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_cpu_definition():
    d = load(DEFINITION)
    assert d.header["from"] == "debian:12"  # Debian's Open MPI 4.1 + PMIx 4.2, as the Slurm test cluster
    assert d.arguments["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"  # serves torch==...+cpu
    assert "OMPI_MCA_btl_vader_single_copy_mechanism" in d.body("environment")
    # %test: both frameworks' imports when installed, and TensorFlow required in Horovod only then.
    assert "import tensorflow" in d.body("test") and r"'\[X\] TensorFlow'" in d.body("test")


def test_cuda_definition():
    d = load(CUDA_DEFINITION)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-devel-ubuntu24\.04", d.header["from"]), d.header["from"]
    post = d.body("post")
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in post and "HPCTRAIN_TORCH=" in post and "TORCH_INDEX_URL=" in post
    assert re.search(r"TORCH_INDEX=https://download\.pytorch\.org/whl/cu12\d", d.body("arguments"))
    assert "ldconfig /usr/local/cuda/lib64/stubs" in post  # Horovod links against libcuda on a GPU-less build host
    assert "NCCL_" in d.body("environment")
    assert "for fw in PyTorch MPI NCCL" in d.body("test") and "nvidia-smi -L" in d.body("test")


def test_build_arguments_are_substituted():
    d = load(DEFINITION, {"FRAMEWORKS": "torch,tf"})
    assert 'HPCTRAIN_FRAMEWORKS="torch,tf"' in d.body("post") and "{{" not in d.body("post")


# The parser, on small definitions.
def test_parser_reads_header_sections_files_labels_arguments():
    text = ("Bootstrap: docker\nFrom: debian:{{ V }}  # a comment\n\n%arguments\n    V=12\n    # note\n"
            "%files\n    a.txt\n    \"b c\" /opt/b\n%post -c /bin/bash\n    echo one\n%labels\n    Author me and you\n"
            "%post\n    echo two\n")
    d = parse(render(text, {"V": "11"}))
    assert d.header == {"bootstrap": "docker", "from": "debian:11"}
    assert d.files == [("a.txt", "a.txt"), ("b c", "/opt/b")]
    assert d.labels == {"Author": "me and you"} and d.section_args["post"] == "-c /bin/bash"
    assert d.body("post") == "    echo one\n    echo two\n"  # repeated sections are appended, as Apptainer does


@pytest.mark.parametrize("text, args, words", [
    ("Bootstrap: docker\n%postt\n  x\n", None, "unknown section '%postt'"),
    ("From: debian:12\n%post\n  x\n", None, "no 'Bootstrap:' header"),
    ("Bootstrap: docker\nFrom debian\n", None, "has no 'Key: value'"),
    ("Bootstrap: docker\nFlavour: x\n", None, "unknown header keyword 'flavour'"),
    ("Bootstrap: docker\n%post\n  {{ X }}\n", None, "no value for {{ X }}"),
    ("Bootstrap: docker\n%arguments\n  X=1\n%post\n  {{ X }}\n", {"Y": "2"}, "build argument(s) Y not used"),
    ("Bootstrap: docker\n%arguments\n  not an argument\n", None, "is not NAME=value"),
])
def test_parser_refuses_with_one_line(text, args, words):
    with pytest.raises(DefinitionError) as e:
        parse(render(text, args))
    assert words in str(e.value) and "\n" not in str(e.value)
