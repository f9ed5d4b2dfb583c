"""Other projects' KTO code checked as it is.

  trl          the installed TRL's own KTOTrainer: `kto-np oracle trl` (optional extra oracle-trl)
  liger        the installed Liger-Kernel's KTO loss: `kto-np oracle liger`
  ecosystems   the projects' own source files with one flag (--ecosystem trl|llamafactory|halos|openrlhf|
               easydel|liger): the stand-in self, config and accelerator their code reads
  jax_support  gradients of JAX candidates by jax.grad (as autograd for torch)

Nothing is imported here: each module is imported by its full name.
"""
