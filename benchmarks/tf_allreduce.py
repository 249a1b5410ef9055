"""How the TF engine combines gradients under Horovod 0.28.1 + Keras 3 (horovod #4290: the usual
`DistributedGradientTape` path calls `var.ref()`, which Keras 3 variables lack). Two routes work:

  each     plain tf.GradientTape, then one hvd.allreduce per gradient (Horovod fuses them): what hpctrain uses
  grouped  plain tf.GradientTape, then one hvd.grouped_allreduce over all gradients
  tape     hvd.DistributedGradientTape with the wrapped tf.Variables (`v.value`) as the tape's sources
  none     the same step without any communication (each rank alone: the ceiling for this world size)

Same TF ResNet-18 (keras-hub backbone), fixed synthetic batch, one tf.function step each, timed after
warm-up, run in turn inside one job.

    python benchmarks/tf_allreduce.py [--np 2] [--steps 20] [--out benchmarks/results/tf_allreduce.json]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(a) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("HOROVOD_CYCLE_TIME", "10")  # hpctrain's CPU default
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf
    sys.path.insert(0, str(ROOT))
    from hpctrain.models.tf.resnet import Classification, build_resnet

    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    keras.utils.set_random_seed(0)
    task = Classification()
    x = tf.random.normal((a.batch_size, a.image_size, a.image_size, 3))
    y = tf.random.uniform((a.batch_size,), 0, 10, dtype=tf.int64)
    rows = {}
    def make_step(mode, model, opt):
        variables = model.trainable_variables

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss, _ = task(model, (x, y), training=True)
            if mode == "tape":
                grads = hvd.DistributedGradientTape(tape).gradient(loss, [v.value for v in variables])
            else:
                grads = tape.gradient(loss, variables)
                if mode == "grouped":
                    grads = hvd.grouped_allreduce(grads, op=hvd.Average)
                elif mode == "each":
                    grads = [hvd.allreduce(g, op=hvd.Average) for g in grads]
            opt.apply_gradients(zip(grads, variables))
            return loss
        return step

    for mode in ("none", "each", "grouped", "tape", "each"):  # "each" twice: first and last, to see drift
        model = build_resnet("resnet18", 10, a.image_size)
        opt = keras.optimizers.SGD(0.01, momentum=0.9)
        opt.build(model.trainable_variables)
        step = make_step(mode, model, opt)
        for _ in range(3):
            step()
        hvd.allreduce(tf.constant(0.0), name=f"sync.{mode}.{len(rows)}")  # start the window together
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        rate = a.batch_size * a.steps / (time.perf_counter() - t0)
        total = float(hvd.allreduce(tf.constant(rate), op=hvd.Sum, name=f"rate.{mode}.{len(rows)}"))
        rows.setdefault(mode, []).append(total)
    if hvd.rank() == 0:
        print("RESULT " + json.dumps({"np": hvd.size(), "samples_per_s_total": rows}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tf_allreduce.json"))
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(a.np), "--oversubscribe", "--bind-to", "none",
           sys.executable, __file__, "--worker", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--image-size", str(a.image_size), "--threads", str(a.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
        return 1
    result = json.loads(lines[0][len("RESULT "):])
    result.update(steps=a.steps, batch_size=a.batch_size, image_size=a.image_size, threads=a.threads)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
