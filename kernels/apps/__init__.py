"""Reference workloads the gateway's example jobs run: ``python -m kernels.apps.NAME``.

    train    data-parallel MLP training (checkpoint/resume, metrics JSON)
    search   batch embedding search, embeddings sharded over ranks
    kmeans   distributed k-means

Each runs as one process without MPI, or under ``mpirun -n N`` with mpi4py.
"""
