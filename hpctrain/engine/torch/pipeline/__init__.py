"""Pipeline x data parallel for the torch engine: profiler, mpi4py stage runtime, the step plan.
The partition maths and schedules are framework-neutral (hpctrain/pipeline/)."""
