"""Running a candidate: calling it, fitting its signature, loading it, and the child processes it runs in.

  candidates   calling a candidate: NumPy, torch autograd, JAX, finite differences (one call per kind)
  conventions  a candidate's own signature mapped onto the oracle's call (CONVENTIONS: kto_np, split, ...)
  loader       loading a candidate from a spec ("module:function", "path/file.py:Class.method")
  runner       the one child-process runner: a candidate isolated in a child with a time limit, or the
               data_parallel kind's ranks in a gloo process group on 127.0.0.1; the verdict stays here
  worker       the child side of the runner: `python -m kto_np.oracle.run.worker check|rank|launcher ...`

Nothing is imported here: each module is imported by its full name.
"""
