"""hpctrain.image: the runtime detected from what it leaves behind, and the MPI settings applied under the runtimes
that start one container per rank, a site's own value kept."""
import pytest

from hpctrain import image


@pytest.mark.parametrize("env, files, runtime", [
    ({"CH_RUNNING": "Weird Al Yankovic"}, [], "charliecloud"),
    ({"APPTAINER_CONTAINER": "/x.sif"}, [], "apptainer"),
    ({}, [".singularity.d/"], "apptainer"),
    ({"ENROOT_ROOTFS": "/x"}, [], "enroot"),
    ({}, ["run/.containerenv"], "podman"),
    ({}, [".dockerenv"], "docker"),
    ({}, [], None),
])
def test_runtime(tmp_path, env, files, runtime):
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        if f.endswith("/"):
            (tmp_path / f).mkdir(exist_ok=True)
        else:
            (tmp_path / f).write_text("")
    assert image.runtime(env, str(tmp_path)) == runtime


def test_apply_sets_only_what_is_missing_and_only_per_rank(tmp_path):
    env = {"CH_RUNNING": "1", "PMIX_MCA_gds": "ds21"}  # the site chose its own data store
    assert image.apply(env, str(tmp_path)) == ["OMPI_MCA_btl_vader_single_copy_mechanism", "OPENBLAS_NUM_THREADS"]
    assert env["OMPI_MCA_btl_vader_single_copy_mechanism"] == "none" and env["PMIX_MCA_gds"] == "ds21"
    assert image.apply(env, str(tmp_path)) == []  # nothing more to add
    (tmp_path / ".dockerenv").write_text("")
    host = {}
    assert image.apply(host, str(tmp_path)) == [] and host == {}  # docker: the launcher is in the container too


def test_a_site_can_turn_the_image_settings_off(tmp_path):
    env = {"CH_RUNNING": "1", "HPCTRAIN_IMAGE_SETTINGS": "off"}
    assert image.apply(env, str(tmp_path)) == [] and "PMIX_MCA_gds" not in env
