"""Versions and builds: Python, PyTorch, TensorFlow, Horovod and its PyTorch and TensorFlow extensions."""
from __future__ import annotations

import os
import platform
import sys

from hpctrain import quiet
from hpctrain.doctor.common import Context, installed, needs_tensorflow
from hpctrain.doctor.registry import INSTALL_FIX, Outcome, check

HOROVOD_TF_FIX = ("rebuild Horovod with TensorFlow (HOROVOD_WITH_TENSORFLOW=1 scripts/install.sh, the site's MPI "
                  "module loaded), or train TensorFlow with --backend multiworker")


def load_tensorflow():
    """`import tensorflow`, its C++ start-up lines (absl, CUDA probing) kept off the console."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as the TF engine does; a user's own setting wins
    with quiet.captured():
        import tensorflow as tf
    return tf


def controllers(hvd) -> tuple[dict, str]:
    """Horovod's built flags (of one framework extension) and their text."""
    built = {"MPI": bool(hvd.mpi_built()), "Gloo": bool(hvd.gloo_built()), "NCCL": bool(hvd.nccl_built())}
    return built, ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in built.items())


@check("python", order=10)
def python_version(ctx: Context) -> Outcome:
    return "PASS", f"{platform.python_version()} ({sys.executable})", None


@check("torch", order=20)
def torch_build(ctx: Context) -> Outcome:
    import torch
    hip = getattr(torch.version, "hip", None)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {hip}" if hip else "CPU build"
    ctx.facts.update(torch=True, gpu_build=build != "CPU build")
    return "PASS", f"{torch.__version__} ({build})", None


@check("tensorflow", order=30)
def tensorflow_version(ctx: Context) -> Outcome:
    if not installed("tensorflow"):
        return "PASS", "not installed (optional)", None
    tf = load_tensorflow()
    ctx.facts.update(tensorflow=True, tf_gpu_build=bool(tf.test.is_built_with_cuda() or tf.test.is_built_with_rocm()))
    return "PASS", tf.__version__, None


@check("horovod", order=40)
def horovod_build(ctx: Context) -> Outcome:
    import horovod
    import horovod.torch as hvd
    from horovod.common.util import get_extension_full_path
    # What `horovodrun --check-build` lists, without its fork per question: which extensions exist.
    libs = {"PyTorch": ("torch", "mpi_lib_v2"), "TensorFlow": ("tensorflow", "mpi_lib"), "MXNet": ("mxnet", "mpi_lib")}
    frameworks = [n for n, lib in libs.items() if os.path.exists(get_extension_full_path(horovod.__file__, *lib))]
    built, flags = controllers(hvd)
    ctx.facts.update(hvd_mpi=built["MPI"], hvd_gloo=built["Gloo"])
    detail = f"{horovod.__version__}; frameworks: {', '.join(frameworks) or 'none'}; built with {flags}"
    if not (built["MPI"] or built["Gloo"]):
        return "FAIL", detail, "Horovod has no controller: " + INSTALL_FIX
    if ctx.facts.get("gpu_build") and not built["NCCL"]:
        return "WARN", detail, "GPU torch but no NCCL: rebuild Horovod with HOROVOD_GPU_OPERATIONS=NCCL"
    return "PASS", detail, None


@check("horovod tensorflow", order=45, when=needs_tensorflow, error_fix=HOROVOD_TF_FIX)
def horovod_tensorflow(ctx: Context) -> Outcome:
    """--framework tf --backend horovod needs Horovod's TensorFlow ops; the other TF backends do not: a WARN."""
    try:
        with quiet.captured():
            import horovod.tensorflow as hvd
    except ImportError as e:  # "Extension horovod.tensorflow has not been built", or a TF/Horovod ABI mismatch
        return "WARN", f"horovod.tensorflow does not import: {e}", HOROVOD_TF_FIX
    built, flags = controllers(hvd)
    detail = f"TensorFlow ops built with {flags}"
    if not (built["MPI"] or built["Gloo"]):
        return "WARN", detail, "Horovod's TensorFlow ops have no controller: " + HOROVOD_TF_FIX
    if ctx.facts.get("gpu_build") and not built["NCCL"]:
        return "WARN", detail, "GPUs but no NCCL: rebuild Horovod with HOROVOD_GPU_OPERATIONS=NCCL"
    return "PASS", detail, None
