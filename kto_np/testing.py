"""Assertions for users' test suites, in the idiom of numpy.testing.

    from kto_np.testing import assert_kto_matches

    def test_my_kto_loss():
        assert_kto_matches(my_kto_loss)                      # kind="kto_loss", variant="kto"
        assert_kto_matches("my_pkg.losses:MyKTO", convention="split")

A failing check raises AssertionError whose message is the oracle's report: its first line is the verdict
and the diagnosis (the known mistake the numbers match), then the failing numbers. pytest shows the test's
own line and that message, not this module's frames. A candidate that cannot be loaded raises the oracle's
LoadError. The candidate runs in a child process when it can be named there (a spec string or a
module-level function or class), so that an exit or a crash in it fails the assertion instead of ending
the tests.
"""

from __future__ import annotations

from .oracle import DEFAULT_TIMEOUT, KL_ROTATION, VARIANTS, Report, verify

__all__ = ["assert_kto_matches"]


def assert_kto_matches(candidate, kind: str = "kto_loss", variant: str | None = "kto", tolerance: str = "float64",
                       convention: str | None = None, *, cases=None, timeout: float | None = DEFAULT_TIMEOUT,
                       kl_rotation: int = KL_ROTATION) -> Report:
    """Raise AssertionError (message: the oracle's report, the verdict first) unless `candidate` passes every
    case of `kind`.

    candidate: a callable or a spec ("module:function", "path/file.py:function", "module:Class",
    "module:Class.method"). variant: the loss variant ("kto" by default; for a kind without a variant
    "kto" the kind's default). tolerance: "float64" or "float32". convention: None (detected), "kto_np" or "split".
    Returns the passing Report (its not_verified lists mistakes no check could rule out).
    """
    __tracebackhide__ = True  # pytest: show the caller's line and the report, not this function
    if variant is not None and kind in VARIANTS and (VARIANTS[kind] == (None,)
                                                     or (variant == "kto" and "kto" not in VARIANTS[kind])):
        variant = None  # the default "kto" does not apply: the kind's own default (or no variant) instead
    report = verify(candidate, kind, variant, cases, tolerance=tolerance, timeout=timeout, convention=convention,
                    kl_rotation=kl_rotation)
    if not report.passed:
        raise AssertionError(f"{report}\nassert_kto_matches: the candidate does not match kto_np's reference")
    return report
