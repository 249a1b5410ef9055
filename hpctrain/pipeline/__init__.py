"""Pipeline parallelism: partition maths (pure), profiler, mpi4py runtime."""
