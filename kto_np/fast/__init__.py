"""The fast room: the reading edition's ops, made fast.

Each module here has the functions of its reading-edition twin, with the same names and signatures and
the same numbers (float64 to 1e-12 relative, float32 to 1e-5; `tests/test_fast.py` checks every pair):

    kto_np.fast.layers    <->  kto_np.layers     in-place buffers, contiguous heads for OpenBLAS
    kto_np.fast.logprobs  <->  kto_np.logprobs   cache-sized blocks over the vocabulary, dlogits in the logits
    kto_np.fast.optim     <->  kto_np.optim      AdamW and the gradient norm in cache-sized blocks

    kto_np.fast.head      (no twin)             the head and the log-probs at the scored positions only
    kto_np.fast.packed    (no twin)             the body on the positions the loss reads, rows end to end
    kto_np.fast.threads   (no twin)             the thread pool the blocks above are spread over

NumPy releases the GIL in its ufuncs and reductions, so the fast ops cut their arrays into fixed,
cache-sized blocks and run the blocks on a few threads (KTO_NP_THREADS, default NumPy's BLAS thread
count; 1 = no threads). The blocks depend on the shapes only, so the numbers do not depend on the
thread count. CuPy arrays are computed whole, on the device, with no threads.

Read the reading edition first: these files say how, not what. A model built with `fast=True`
(`kto_np.build(..., fast=True)`) runs its forward and backward on `fast.layers`; training, the demo and
the benchmark use the fast room, the oracle, gradcheck and the tutorials the reading edition.

The fast ops assume checked arguments: the public doors (GPT.forward, kto_step, adamw_step, ...) check
once, and nothing in here checks again.
"""
