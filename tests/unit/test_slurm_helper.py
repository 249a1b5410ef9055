"""python -m hpctrain.slurm: validation (nothing unchecked reaches a shell script) and rendering from
the template's #SBATCH header; slurm/env.sh's site loading and checks. The supervisor (python -m hpctrain.slurm
supervise) and the shell side holding no exit code of hpctrain: tests/unit/test_slurm_supervise.py."""
import re
import subprocess
import sys

import pytest

from hpctrain import slurm as helper
from tests.launch import ROOT, env

TEMPLATE = ROOT / "slurm" / "resnet_8node.sh"


def _cli(*argv, extra_env=None):
    e = env()
    e.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "hpctrain.slurm", *argv], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=60)


def _header(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, re.M))


@pytest.mark.parametrize("argv, words", [
    (["--nodes", "0"], "--nodes: '0' is not a positive integer"),
    (["--nodes", "8;reboot"], "--nodes: '8;reboot' is not a positive integer"),
    (["--nodes", "$(id)"], "--nodes: '$(id)' is not a positive integer"),
    (["--gpus-per-node", "-1"], "--gpus-per-node: '-1' is not an integer >= 0"),
    (["--gpus-per-node", "4x"], "--gpus-per-node: '4x' is not an integer >= 0"),
    (["--job-name", "a b"], "--job-name: 'a b' is not allowed (allowed: letters, digits, '_', '.', '-')"),
    (["--job-name", "x\n#SBATCH --uid=0"], "--job-name: 'x\\n#SBATCH --uid=0' is not allowed"),
    (["--job-name", "`touch /tmp/pwned`"], "is not allowed"),
    (["--site", "../etc/passwd"], "--site: '../etc/passwd' is not allowed"),
    (["--site", "nosuchsite"], "--site: 'nosuchsite' has no file slurm/sites/nosuchsite.sh (allowed: default, "),
    (["--time", "30:75"], "--time: '30:75' is not a Slurm time limit (allowed: MM, MM:SS, HH:MM:SS, D-HH"),
    (["--time", "1-24"], "--time: '1-24' is not a Slurm time limit"),
    (["--time", "0:00:00"], "is not a Slurm time limit"),
    (["--time", "02:00:00;rm"], "is not a Slurm time limit"),
    (["--model", "gpt"], "argument --model: invalid choice: 'gpt'"),
    (["--", "--epochs", "3"], "training arguments '--epochs 3' are passed on only with --submit"),
])
def test_bad_value_one_line_exit_2(argv, words):
    p = _cli(*argv)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == ""  # no half-rendered script
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpctrain.slurm: error: ") and words in lines[0], p.stderr


def test_bad_value_from_site_environment_is_refused():
    # The site file defers to the environment, so an account from the environment is checked too.
    p = _cli("--site", "default", extra_env={"HPCTRAIN_ACCOUNT": "acct\n#SBATCH --uid=0"})
    assert p.returncode == 2 and "HPCTRAIN_ACCOUNT: 'acct\\n#SBATCH --uid=0' is not allowed" in p.stderr


@pytest.mark.parametrize("text", ["30", "30:15", "90:00", "12:00:00", "48:00:00", "2-12", "2-12:30", "2-12:30:05",
                                  "0-1"])
def test_slurm_time_formats_accepted(text):
    assert helper.slurm_time(text) == text


def test_render_substitutes_header_and_keeps_body():
    template = TEMPLATE.read_text()
    out = helper.render("resnet", nodes=3, gpus_per_node=2, site="example_gpu", time="1-00:30", job_name="r50.a")
    h = _header(out)
    assert h["nodes"] == "3" and h["ntasks-per-node"] == "2" and h["gpus-per-node"] == "2"
    assert h["time"] == "1-00:30" and h["job-name"] == "r50.a" and h["output"] == "r50.a-%j.out"
    assert h["account"] == "myproject" and h["partition"] == "gpu"
    assert h["export"] == "ALL,HPCTRAIN_SITE=example_gpu,HPCTRAIN_GPUS_PER_NODE=2"
    # Unchanged header lines and the whole body come from the template.
    for key in ("exclusive", "signal", "requeue", "open-mode", "mem"):
        assert h[key] == _header(template)[key]
    body = lambda s: [ln for ln in s.splitlines() if not ln.startswith("#")]  # noqa: E731
    assert body(out) == body(template)
    assert out.splitlines()[0] == "#!/bin/bash"
    syntax = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_render_cpu_site_has_no_gpu_request_and_template_defaults():
    out = helper.render("resnet", site="testcluster")
    h = _header(out)
    assert "gpus-per-node" not in h and "account" not in h and "partition" not in h
    assert h["nodes"] == "8" and h["ntasks-per-node"] == "1" and h["time"] == "02:00:00"
    assert h["export"] == "ALL,HPCTRAIN_SITE=testcluster,HPCTRAIN_GPUS_PER_NODE=0"


def test_gpus_default_to_the_site_file():
    assert _header(helper.render("resnet", site="example_gpu"))["gpus-per-node"] == "4"


def test_cli_prints_the_rendered_script():
    p = _cli("--nodes", "2", "--site", "testcluster", "--time", "15", "--job-name", "tiny")
    assert p.returncode == 0, p.stderr
    assert p.stdout == helper.render("resnet", nodes=2, site="testcluster", time="15", job_name="tiny")


def test_template_is_thin_and_portable():
    text = TEMPLATE.read_text()
    h = _header(text)
    assert h["nodes"] == "8" and h["signal"].startswith("B:USR1@") and "requeue" in h and "%j" in h["output"]
    assert "/home/" not in text and "/work/" not in text
    assert 'source "$HPCTRAIN_ROOT/slurm/env.sh"' in text and "SLURM_SUBMIT_DIR" in text
    assert '-m hpctrain.resnet "$@"' in text


def _env_sh(site_env: dict, script: str) -> subprocess.CompletedProcess:
    """Source slurm/env.sh as the batch script would and run `script` after it."""
    e = env()
    e.update(site_env)
    return subprocess.run(["bash", "-c", f'HPCTRAIN_ROOT="$1"; source "$1/slurm/env.sh" || exit $?; {script}',
                           "_", str(ROOT)], env=e, capture_output=True, text=True, timeout=30)


def test_env_sh_gpu_site_builds_srun_and_container_lines():
    # Lmod and Environment Modules hand `module` to batch shells as an exported bash function.
    p = _env_sh({"HPCTRAIN_SITE": "example_gpu", "SLURM_JOB_NUM_NODES": "3", "HPCTRAIN_IMAGE": "/images/h.sif",
                 "BASH_FUNC_module%%": '() { echo "module $*" >&2; }'},
                'printf "%s|" "${HPCTRAIN_SRUN_ARGS[@]}"; echo; printf "%s|" "${HPCTRAIN_EXEC[@]}"')
    assert p.returncode == 0 and "module load apptainer" in p.stderr, p.stderr
    srun, exe = p.stdout.splitlines()[-2:]
    assert srun == "--mpi=pmix|--kill-on-bad-exit=1|--ntasks-per-node=4|--ntasks=12|--gpus-per-node=4|", \
        p.stdout + p.stderr
    assert exe.startswith("apptainer|exec|--nv|--bind|") and exe.endswith("|/images/h.sif|python3|")


def test_env_sh_cpu_site_has_no_gpu_or_container():
    p = _env_sh({"HPCTRAIN_SITE": "testcluster"},
                'printf "%s|" "${HPCTRAIN_SRUN_ARGS[@]}"; echo; printf "%s|" "${HPCTRAIN_EXEC[@]}"')
    srun, exe = p.stdout.splitlines()[-2:]
    assert srun == "--mpi=pmix|--kill-on-bad-exit=1|" and exe == f"{ROOT}/.venv/bin/python|"


@pytest.mark.parametrize("site_env, words", [
    ({"HPCTRAIN_SITE": "no/such"}, "HPCTRAIN_SITE='no/such' is not a site name"),
    ({"HPCTRAIN_SITE": "nosuch"}, "HPCTRAIN_SITE=nosuch: no file slurm/sites/nosuch.sh"),
    ({"HPCTRAIN_SITE": "default", "HPCTRAIN_GPUS_PER_NODE": "four"}, "HPCTRAIN_GPUS_PER_NODE='four' is not"),
    ({"HPCTRAIN_SITE": "default", "HPCTRAIN_MAX_REQUEUES": "-1"}, "HPCTRAIN_MAX_REQUEUES='-1' is not"),
    ({"HPCTRAIN_SITE": "default", "HPCTRAIN_MODULES": "cuda/12"}, "no 'module' command"),
])
def test_env_sh_refuses_bad_settings(site_env, words):
    p = _env_sh(site_env, "echo reached")
    assert p.returncode == 2 and "reached" not in p.stdout
    assert p.stderr.strip().startswith("hpctrain: error: ") and words in p.stderr, p.stderr


def test_render_bert_template():
    out = helper.render("bert", nodes=2, site="testcluster", time="30")
    assert _header(out)["nodes"] == "2" and "-m hpctrain.bert \"$@\"" in out and "hpctrain.resnet" not in out
    assert _header(helper.render("bert"))["nodes"] == "4"  # the template's own default


PIPELINE = ROOT / "slurm" / "pipeline_hybrid.sh"


def test_render_pipeline_template():
    template = PIPELINE.read_text()
    out = helper.render("pipeline", nodes=6, gpus_per_node=4, site="example_gpu", time="45", job_name="pp")
    h = _header(out)
    assert h["nodes"] == "6" and h["ntasks-per-node"] == "4" and h["gpus-per-node"] == "4" and h["time"] == "45"
    assert h["job-name"] == "pp" and h["output"] == "pp-%j.out" and h["account"] == "myproject"
    assert h["export"] == "ALL,HPCTRAIN_SITE=example_gpu,HPCTRAIN_GPUS_PER_NODE=4"
    for key in ("exclusive", "signal", "requeue", "open-mode", "mem"):
        assert h[key] == _header(template)[key]
    body = lambda s: [ln for ln in s.splitlines() if not ln.startswith("#")]  # noqa: E731
    assert body(out) == body(template)
    syntax = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # The template's own defaults, and the CLI's --model choice.
    h = _header(helper.render("pipeline", site="testcluster"))
    assert h["nodes"] == "4" and h["ntasks-per-node"] == "1" and h["job-name"] == "hpctrain-pipeline"
    p = _cli("--model", "pipeline", "--nodes", "2", "--site", "testcluster", "--time", "15")
    assert p.returncode == 0 and p.stdout == helper.render("pipeline", nodes=2, site="testcluster", time="15")


def test_pipeline_template_is_thin_and_shares_env_sh():
    text = PIPELINE.read_text()
    h = _header(text)
    assert h["signal"].startswith("B:USR1@") and "requeue" in h and "%j" in h["output"]
    assert "/home/" not in text and "/work/" not in text
    assert 'source "$HPCTRAIN_ROOT/slurm/env.sh"' in text and "SLURM_SUBMIT_DIR" in text
    # Same launch, requeue and restart path as the other templates: env.sh's hpctrain_step.
    assert 'hpctrain_step -m "hpctrain.$MODEL"' in text and text.rstrip().endswith('"$@"')
    assert "srun" not in text.split("hpctrain_step")[-1] and "scontrol requeue" not in text
    syntax = subprocess.run(["bash", "-n", str(PIPELINE)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def _pipeline_check(settings: dict, cwd) -> subprocess.CompletedProcess:
    """Run the template itself outside Slurm with a made-up job environment. Every case here must stop
    at the script's checks, before srun; SLURM_CONF points nowhere so nothing could reach a cluster."""
    e = env()
    e.update({"HPCTRAIN_ROOT": str(ROOT), "HPCTRAIN_SITE": "testcluster", "SLURM_CONF": str(cwd / "none.conf"),
              "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}, **settings)
    return subprocess.run(["bash", str(PIPELINE), "--max-steps", "1"], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("settings, words", [
    ({"SLURM_NTASKS": "3"}, "PIPELINE_STAGES=2 does not divide the 3 ranks of this job"),
    ({"SLURM_NTASKS": "8", "PIPELINE_STAGES": "3"}, "PIPELINE_STAGES=3 does not divide the 8 ranks of this job"),
    # GPU mode: srun starts nodes x GPUs ranks (env.sh), whatever the header's tasks say.
    ({"SLURM_NTASKS": "3", "SLURM_JOB_NUM_NODES": "3", "HPCTRAIN_GPUS_PER_NODE": "4", "PIPELINE_STAGES": "8"},
     "PIPELINE_STAGES=8 does not divide the 12 ranks of this job"),
    ({"SLURM_NTASKS": "4", "PIPELINE_STAGES": "0"}, "PIPELINE_STAGES='0' is not a positive integer"),
    ({"SLURM_NTASKS": "4", "PIPELINE_STAGES": "a[$(touch pwned)]"}, "is not a positive integer"),
    ({"SLURM_NTASKS": "4", "MODEL": "gpt"}, "MODEL='gpt' is not allowed (allowed: resnet, bert)"),
    ({}, "no task count (SLURM_NTASKS=''): run this script with sbatch"),
])
def test_pipeline_template_refuses_bad_layout_before_srun(settings, words, tmp_path):
    p = _pipeline_check(settings, tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpctrain: error: ") and words in lines[0], p.stderr
    assert "hpctrain: pipeline " not in p.stdout
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()
