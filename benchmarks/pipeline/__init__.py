"""Pipeline parallelism: how well the partitioner balances stages, how close a real 2-stage pipeline
gets to its ideal, and mpi4py vs Horovod process sets for a stage's replica gradient average.

    python -m benchmarks.pipeline [--quick] [--out DIR] [--parts abc]     (from the repository root)

A. Partition balance (one process; balance.py). Profile the blocks of ResNet and BERT
   (hpctrain.engine.torch.pipeline.profile), partition for each P with the time / params / uniform methods and
   record the predicted stage times, bottleneck, lower bound and balance = bottleneck / lower bound, plus
   bottleneck(params) / bottleneck(time) and bottleneck(uniform) / bottleneck(time). Then every planned stage
   is run for real (its blocks forward + backward on the sample micro-batch, median of repeats, all stages
   interleaved inside each repeat, beside every single block measured the same way; the profile's run is the
   warm-up) and the same figures are recorded from those measurements: measured lower bound = max(sum of
   measured blocks / P, largest measured block), the partitioner's bound on measured rather than profiled
   block times.
B. Pipeline throughput (mpirun -np P, D = 1, one torch thread per rank; pipe_worker.py). Time-balanced plan,
   made as the torch Trainer's pipeline step plan makes it by default (make_plan in
   hpctrain/engine/torch/pipeline/step.py: profiled on every rank, median per block); for each schedule and M,
   the pipelined step (PipelineStage.step, then the optimizer step) beside the sequential step (rank 0 runs the
   same M micro-batches through the whole model, forward+backward+optimizer, while the other ranks sleep),
   both inside every repeat. speedup = sequential / pipelined (paired per repeat), efficiency = speedup / P,
   ideal = M / (M + P - 1) x mean / max of the stage times measured alone, and the makespan ideal of
   hpctrain.pipeline.schedule.simulate on the measured forward / backward times. The stages are also
   timed all at once ("concurrent"); the contended ideal uses those (the sequential peer runs alone),
   which is what a machine whose cores or memory are shared (with other jobs) allows.
C. Replica gradient averaging (mpirun -np 4: P = 2 stages x D = 2 replicas; reduce_worker.py): MPIReducer
   (one mpi4py Allreduce) vs HorovodReducer (one process set per stage) on flat float32 buffers, both stages
   reducing at once as in training; engines alternate inside each repeat; algbw = bytes / time.
   Pass 1 sets HOROVOD_CYCLE_TIME to hpctrain's CPU default (10 ms, set by start_horovod in hpctrain.engine);
   pass 2 (--hvd-default-pass 1; off with --quick) leaves it unset (Horovod's own default), which is what a
   pipelined run with --pipeline-allreduce horovod gets (that path never sets the variable). Each pass is
   its own mpirun with its own mpi peer: re-initialising Horovod in one process is not reliable (see
   reduce_worker.worker_reduce).

Writes DIR/pipeline.json and DIR/pipeline.png (DIR: benchmarks/results; --quick: a new temp directory;
report.py). Statistics: mean +/- 1.96 sd over repeats.

Modules: options (settings, command line), models (models, stage timing), balance (A), pipe_worker (B, one
rank), reduce_worker (C, one rank), launch (the mpirun runs of B and C), report (summary and plot),
__main__ (the command).
"""
