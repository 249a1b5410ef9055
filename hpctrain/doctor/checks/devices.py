"""GPUs per rank, as PyTorch and as TensorFlow see them, and threads per rank. The text is rank-neutral:
ranks that see the same add nothing to the line."""
from __future__ import annotations

from hpctrain import quiet
from hpctrain.cluster import threads_per_rank, visible_gpu_index
from hpctrain.doctor.checks.software import load_tensorflow
from hpctrain.doctor.common import Context, needs_tensorflow
from hpctrain.doctor.registry import Outcome, check

GPU_FIX = "launch one rank per GPU (srun --ntasks-per-node=<GPUs>), or --device cpu"
TF_GPU_FIX = ("TensorFlow finds no CUDA libraries that fit this driver: install its CUDA build "
              "(pip install 'tensorflow[and-cuda]'), or load the site's CUDA module it was built for")


@check("gpus", order=100, error_fix=GPU_FIX)
def gpus(ctx: Context) -> Outcome:
    import torch
    c, n, threads = ctx.cluster, torch.cuda.device_count(), threads_per_rank(ctx.cluster)
    ctx.facts["gpus"] = n
    if n == 0:
        detail = f"no GPU: training runs on CPU, {threads} thread(s) per rank, {c.local_size} rank(s) on this node"
        return ("WARN", detail, "a GPU build of torch sees no GPU: request GPUs (--gres=gpu:N) or check "
                "CUDA_VISIBLE_DEVICES") if ctx.facts.get("gpu_build") else ("PASS", detail, None)
    name = torch.cuda.get_device_name(visible_gpu_index(c, n))  # raises if more ranks than GPUs
    detail = f"{n} GPU(s) visible ({name}), {c.local_size} rank(s) on this node bind cuda:<local rank>, " \
             f"{threads} thread(s) per rank"
    if n > c.local_size:
        return "WARN", detail, f"{n - c.local_size} GPU(s) idle: launch one rank per GPU (--ntasks-per-node={n})"
    return "PASS", detail, None


@check("tf devices", order=105, when=needs_tensorflow, error_fix=GPU_FIX)
def tf_devices(ctx: Context) -> Outcome:
    tf = load_tensorflow()
    with quiet.captured():  # the device query loads CUDA and logs from C++
        found = tf.config.list_physical_devices("GPU")
    c, n = ctx.cluster, len(found)
    ctx.facts["tf_gpus"] = n
    if n == 0:
        detail = f"no GPU visible to TensorFlow: it runs on CPU, {c.local_size} rank(s) on this node"
        if ctx.facts.get("gpus"):  # PyTorch sees GPUs here: TensorFlow's own CUDA libraries are the problem
            return "WARN", f"{detail}, while PyTorch sees {ctx.facts['gpus']}", TF_GPU_FIX
        return "PASS", detail, None
    visible_gpu_index(c, n)  # raises if more ranks than GPUs
    detail = f"{n} GPU(s) visible to TensorFlow, {c.local_size} rank(s) on this node bind GPU <local rank>"
    if ctx.facts.get("gpus", n) != n:
        return "WARN", f"{detail}, while PyTorch sees {ctx.facts['gpus']}", "the frameworks see different GPUs: " \
            "check both builds' CUDA versions against the driver (nvidia-smi)"
    if n > c.local_size:
        return "WARN", detail, f"{n - c.local_size} GPU(s) idle: launch one rank per GPU (--ntasks-per-node={n})"
    return "PASS", detail, None
