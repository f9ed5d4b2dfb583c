"""What the oracle checks: the reference cases and the mistakes it can name.

  reference     the cases of every kind (inputs, and what kto_np's own core computes on them), KINDS,
                VARIANTS, and the pipeline kinds' modules by name (PIPELINE_MODULES)
  edifice_case  model_edifice's arrays: Edifice's network, Axon names, the unshifted contract
  mistakes      the catalogue of known mistakes and their mutated formulas
  store         export and load of the file store (manifest.json + one .npz per case)
  kl_pairs      the kl_pairs kind: how prompts are paired with completions for the KL estimate
  distributed   the data_parallel and accumulation kinds: cases, references, mutants, the accumulation runs

Nothing is imported here: each module is imported by its full name.
"""
