"""Comparing a candidate's numbers with the reference and reporting what they show.

  report            the checks, the Report (verdict first) and the diagnosis that names known mistakes
  results           results files from any language: `kto-np oracle compare CASES_DIR RESULTS.json`
  pipeline_results  the pipeline kinds' entries in results files

Nothing is imported here: each module is imported by its full name.
"""
