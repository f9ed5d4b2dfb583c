"""The data_parallel kind on a real torch.distributed process group (gloo on 127.0.0.1): right candidates
written with torch.distributed and with the oracle's all_reduce pass, each data-parallel mistake is named,
and a rank that raises or never joins ends the check within a bounded time, with every process gone.

The candidates are module-level functions: every rank imports them from this module by name."""

import os
import time

import numpy as np
import pytest

from kto_np import oracle
from kto_np.oracle.run import runner

# what the tests below cover (test_oracle_mistakes checks that every data-parallel mutant is covered)
DATA_PARALLEL_TESTED = {("data_parallel", "rank_means", m) for m in (
    "dp_z_not_all_reduced", "dp_z_clamped_per_rank", "dp_losses_summed", "global_mean_convention")} | {
    ("data_parallel", "global_mean", m) for m in (
        "dp_z_not_all_reduced", "dp_z_clamped_per_rank", "dp_losses_summed", "rank_means_convention")}


@pytest.fixture(scope="module", autouse=True)
def launcher():
    """One launcher (torch imported once) for the module's checks; each check still gets fresh ranks."""
    with runner.data_parallel_session():
        yield


def torch_or_skip():
    return pytest.importorskip("torch", reason="torch not installed: the data_parallel kind needs torch.distributed")


def cases_named(*ids, variant="rank_means"):
    names = {f"data_parallel/{variant}/{i}" for i in ids}
    return [c for c in oracle.generate_cases() if c.name in names]


def kto_losses(torch, r, labels, z, beta, desirable_weight, undesirable_weight):
    return torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))


def torch_right(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                undesirable_weight, *, rank, world_size, all_reduce):
    """TRL's way: the per-device KL mean, all-reduced with torch.distributed itself, then clamped."""
    import torch
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_rank() == rank and dist.get_world_size() == world_size
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["RANK"]) == rank
    kl = (kl_policy_logps - kl_ref_logps).mean().detach()
    dist.all_reduce(kl)
    z = (kl / world_size).clamp(min=0)
    return kto_losses(torch, policy_logps - ref_logps, labels, z, beta, desirable_weight, undesirable_weight).mean()


def torch_gather_right(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                       undesirable_weight, *, rank, world_size, all_reduce):
    """OpenRLHF's way with all_gather of the per-rank means."""
    import torch
    import torch.distributed as dist

    kl = (kl_policy_logps - kl_ref_logps).mean().detach().reshape(1)
    gathered = [torch.zeros_like(kl) for _ in range(world_size)]
    dist.all_gather(gathered, kl)
    z = torch.cat(gathered).mean().clamp(min=0)
    return kto_losses(torch, policy_logps - ref_logps, labels, z, beta, desirable_weight, undesirable_weight).mean()


def numpy_right(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                undesirable_weight, *, rank, world_size, all_reduce):
    """NumPy, loss only (the oracle takes its gradient by finite differences on every rank in lockstep)."""
    z = max(0.0, float(all_reduce(np.mean(kl_policy_logps - kl_ref_logps), op="mean")))
    r = policy_logps - ref_logps
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    return np.mean(np.where(labels, desirable_weight * (1 - sigmoid(beta * (r - z))),
                            undesirable_weight * (1 - sigmoid(beta * (z - r)))))


def torch_mistake(mistake, policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                  undesirable_weight, rank, world_size, all_reduce):
    import torch

    r = policy_logps - ref_logps
    local = (kl_policy_logps - kl_ref_logps).mean().detach()
    if mistake == "dp_z_not_all_reduced":
        z = local.clamp(min=0)
    elif mistake == "dp_z_clamped_per_rank":  # NeMo-Aligner: clamp, then average
        z = all_reduce(local.clamp(min=0), op="mean")
    elif mistake == "global_mean":  # the other convention: z and the loss over all examples
        count = all_reduce(torch.tensor(float(r.shape[0]), dtype=r.dtype), op="sum")
        z = (all_reduce((kl_policy_logps - kl_ref_logps).sum().detach(), op="sum") / count).clamp(min=0)
        losses = kto_losses(torch, r, labels, z, beta, desirable_weight, undesirable_weight)
        return losses.sum() * world_size / count
    else:
        z = all_reduce(local, op="mean").clamp(min=0)
    loss = kto_losses(torch, r, labels, z, beta, desirable_weight, undesirable_weight).mean()
    return loss * world_size if mistake == "dp_losses_summed" else loss


def z_not_all_reduced(*args, **kwargs):
    return torch_mistake("dp_z_not_all_reduced", *args, **kwargs)


def z_clamped_per_rank(*args, **kwargs):
    return torch_mistake("dp_z_clamped_per_rank", *args, **kwargs)


def losses_summed(*args, **kwargs):
    return torch_mistake("dp_losses_summed", *args, **kwargs)


def global_mean(*args, **kwargs):
    return torch_mistake("global_mean", *args, **kwargs)


def raises_on_rank_1(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                     undesirable_weight, *, rank, world_size, all_reduce):
    if rank == 1:
        raise RuntimeError("rank 1 lost its shard")
    all_reduce(np.zeros(1))  # rank 0 waits in a collective rank 1 never enters
    return 0.0


def hangs_on_rank_0(policy_logps, ref_logps, labels, kl_policy_logps, kl_ref_logps, beta, desirable_weight,
                    undesirable_weight, *, rank, world_size, all_reduce):
    if rank == 0:
        time.sleep(600)
    return all_reduce(np.zeros(1)).sum()  # rank 1 waits for rank 0 in a collective


def assert_no_rank_left(before):
    """No process of a check outlives it: this process's descendants are the same as before (the module's
    launcher stays, idle, until the module ends)."""
    assert _descendants() <= before, f"processes left behind: {_descendants() - before}"


def _descendants():
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


@pytest.mark.slow
def test_right_torch_candidate_passes_on_2_3_4_ranks():
    torch_or_skip()
    before = _descendants()
    report = oracle.verify(torch_right, "data_parallel")
    assert report.passed, report
    assert {len(c.inputs["shard_sizes"]) for c in cases_named("R2_equal", "R3_unequal", "R4_equal")} == {2, 3, 4}
    assert {c.source for c in report.checks if c.quantity.startswith("grad/")} == {"autograd"}
    assert len(report.cases) == 5
    assert_no_rank_left(before)


def test_right_numpy_candidate_through_all_reduce_passes():
    torch_or_skip()
    report = oracle.verify(numpy_right, "data_parallel", cases=cases_named("R2_unequal", "R3_unequal"))
    assert report.passed, report
    assert {c.source for c in report.checks if c.quantity == "grad/policy_logps"} == {"finite differences"}


def test_all_gather_candidate_and_global_mean_convention():
    torch_or_skip()
    report = oracle.verify(torch_gather_right, "data_parallel", cases=cases_named("R2_unequal"))
    assert report.passed, report
    report = oracle.verify(global_mean, "data_parallel", "global_mean",
                           cases=cases_named("R2_unequal", variant="global_mean"))
    assert report.passed, report


@pytest.mark.parametrize("candidate,mistake", [
    (z_not_all_reduced, "dp_z_not_all_reduced"), (z_clamped_per_rank, "dp_z_clamped_per_rank"),
    (losses_summed, "dp_losses_summed"), (global_mean, "global_mean_convention")])
def test_data_parallel_mistake_is_named(candidate, mistake):
    torch_or_skip()
    report = oracle.verify(candidate, "data_parallel", cases=cases_named("R3_unequal"))
    assert not report.passed and report.diagnosis.mistakes == (mistake,), report
    if mistake.endswith("_convention"):
        assert report.diagnosis.message.startswith("follows another convention, not a mistake"), report


def test_a_rank_that_raises_ends_the_check_at_once():
    torch_or_skip()
    before = _descendants()
    started = time.monotonic()
    report = oracle.verify(raises_on_rank_1, "data_parallel", cases=cases_named("R2_unequal", "R2_equal"),
                           timeout=30)
    assert time.monotonic() - started < 25
    message = report.errors["data_parallel/rank_means/R2_equal"]  # the first case of the group
    assert message.startswith("rank 1 raised on data_parallel/rank_means/R2_equal: RuntimeError: rank 1 lost its "
                              "shard"), message
    assert report.errors["data_parallel/rank_means/R2_unequal"].startswith("not run")
    assert_no_rank_left(before)


def test_a_rank_that_hangs_ends_the_check_at_the_time_limit():
    torch_or_skip()
    before = _descendants()
    started = time.monotonic()
    report = oracle.verify(hangs_on_rank_0, "data_parallel", cases=cases_named("R2_unequal"), timeout=2)
    assert time.monotonic() - started < 15
    message = report.errors["data_parallel/rank_means/R2_unequal"]
    assert message.startswith("timed out after 2 s on data_parallel/rank_means/R2_unequal: rank(s) [0, 1] did not "
                              "finish it"), message
    assert_no_rank_left(before)


def test_a_rank_that_never_joins_ends_the_check_in_bounded_time(tmp_path, monkeypatch):
    torch_or_skip()
    (tmp_path / "late_rank.py").write_text(
        "import os, time\n"
        "from test_oracle_distributed import torch_right\n"
        "if os.environ.get('RANK') == '1':\n"
        "    time.sleep(600)  # rank 1 never joins\n"
        "def candidate(*args, **kwargs):\n"
        "    return torch_right(*args, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import late_rank

    monkeypatch.setattr(runner, "JOIN_TIMEOUT", 4.0)
    before = _descendants()
    started = time.monotonic()
    report = oracle.verify(late_rank.candidate, "data_parallel", cases=cases_named("R2_unequal"), timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 20, elapsed
    message = report.errors["data_parallel/rank_means/R2_unequal"]
    assert "rank(s) [0, 1] did not join the process group within 4 s" in message, message
    assert "rank 1: importing the candidate" in message, message
    assert_no_rank_left(before)


def test_without_torch_the_kind_says_why(monkeypatch):
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="torch is not installed"):
        oracle.verify(numpy_right, "data_parallel")
    assert oracle.main_check("test_oracle_distributed:numpy_right", "data_parallel") == 2


def test_a_closure_cannot_be_sent_to_the_ranks():
    torch_or_skip()  # without torch the kind stops earlier, with the ImportError tested above

    def local(*args, **kwargs):
        return 0.0

    with pytest.raises(TypeError, match="importable by name"):
        oracle.verify(local, "data_parallel")


@pytest.mark.parametrize("variant", oracle.VARIANTS["data_parallel"])
def test_builtin_data_parallel_candidates_pass(variant):
    torch_or_skip()
    report = oracle.verify(oracle.builtin_candidate("data_parallel", variant), "data_parallel", variant,
                           cases=cases_named("R3_unequal", "R4_unequal_one_class", variant=variant))
    assert report.passed, report


def test_assert_kto_matches_runs_the_ranks():
    torch_or_skip()
    from kto_np.testing import assert_kto_matches

    assert assert_kto_matches(numpy_right, kind="data_parallel", cases=cases_named("R2_unequal")).passed
    with pytest.raises(AssertionError, match="dp_losses_summed"):
        assert_kto_matches(losses_summed, kind="data_parallel", cases=cases_named("R3_unequal"))
