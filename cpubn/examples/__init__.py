"""Worked examples for cpubn, installed with the package (they need ``cpubn[examples]``).

``cpubn.examples.paper_mnist``
    The Batch Normalization paper's MNIST experiment (Ioffe & Szegedy 2015, section 4.1)
    on scikit-learn's 8x8 digits: a sigmoid MLP with and without ``cpubn.BatchNorm``, its
    test accuracy, sigmoid-input percentiles and a learning-rate sweep.
    Run it with ``python -m cpubn demo`` or ``python -m cpubn.examples.paper_mnist``.
``cpubn.examples.convnet``
    A small convolutional network with ``BatchNorm`` after each convolution, trained in
    channels-first (NCHW, ``axis=1``) and channels-last (NHWC, ``axis=-1``) layouts, then
    used for batch-1 inference in eval mode: ``python -m cpubn.examples.convnet``.
``cpubn.examples.edge_inference``
    A conv net trained with fused ``BatchNorm(activation="relu")``, its BatchNorms folded
    into the neighbouring layers, and batch-1 inference latency and outputs compared
    (unfused, fused, folded): ``python -m cpubn.examples.edge_inference``.
``cpubn.examples.small_batch``
    BatchNorm, BatchRenorm, GhostBatchNorm and BatchNorm with precise statistics trained
    on batches of 2, 4 and 8, on non-i.i.d. two-class batches and on i.i.d. batches of
    60: eval accuracy and train/eval gap over several seeds,
    ``python -m cpubn.examples.small_batch [--plot FILE]``.
``cpubn.examples.data_parallel``
    Data-parallel training of the paper example's digits MLP with ``SyncBatchNorm`` (needs
    ``cpubn[mpi]`` too): each process takes a slice of every batch, and the run is
    compared with one process on the whole batch and with per-process ``BatchNorm``,
    ``mpiexec -n 4 python -m mpi4py -m cpubn.examples.data_parallel``.
``cpubn.examples.port_torch``
    A PyTorch CNN of three Conv-BN-ReLU blocks, trained a few steps, then run in NumPy
    with its BatchNorms ported by ``cpubn.load_state_dicts`` (from the whole-model state
    dict), ``BatchNorm.from_torch`` (fused with the ReLU) and folded into the
    convolutions, in both layouts; eval logits against PyTorch's (needs torch):
    ``python -m cpubn.examples.port_torch``.
``cpubn.examples.nn``
    The minimal NumPy layers both use (Linear, Conv2d via im2col, Sigmoid, ReLU, pooling,
    softmax cross-entropy) and the list-of-layers training helpers.
"""
