"""Robustness at the edges (issue 15): atomic writes and special files, damaged run folders,
divergence, one writer per run folder, crafted files, determinism across BLAS thread counts, CLI edges."""

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from kto_np import checkpoint, cli, files, train
from kto_np.architectures import build

POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX special files")


# ----------------------------------------------------------------------------------------------
# item 3: atomic writes never replace what is not a regular file


@POSIX
def test_atomic_write_writes_through_a_fifo_and_keeps_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []

    def read():
        with open(fifo, "rb") as stream:
            received.append(stream.read())

    reader = threading.Thread(target=read, daemon=True)  # (blocked for ever if the FIFO were replaced)
    reader.start()
    files.write_text(fifo, "hello\n")
    reader.join(timeout=10)
    assert received == [b"hello\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


@POSIX
def test_atomic_write_writes_through_a_character_device(tmp_path):
    device = tmp_path / "fakenull"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a second /dev/null
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here ({exc})")
    files.write_json(device, {"a": 1})
    with files.atomic_write(device, "wb") as f:
        f.write(b"x" * 1000)
    assert stat.S_ISCHR(os.lstat(device).st_mode), "the device node was replaced by a regular file"
    assert sorted(os.listdir(tmp_path)) == ["fakenull"]


@POSIX
def test_atomic_write_follows_a_symlink_and_refuses_a_socket(tmp_path):
    import socket  # noqa: PLC0415

    target = tmp_path / "target.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    files.write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(ValueError, match="neither a regular file"):
            files.write_text(sock_path, "x")
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)


def test_atomic_write_removes_stale_temporaries_of_dead_processes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs
    stale = tmp_path / f".out.json.kto_np.{child.pid}.abcd1234.tmp"
    stale.write_text("half a file")
    alive = tmp_path / f".other.kto_np.{os.getpid()}.abcd1234.tmp"  # ours, still being written
    alive.write_text("in progress")
    foreign = tmp_path / f".notes.{child.pid}.backup.tmp"  # not our naming
    foreign.write_text("someone's")
    files.write_json(tmp_path / "out.json", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["out.json", alive.name, foreign.name])


# ----------------------------------------------------------------------------------------------
# items 4 to 6: damaged run folders, divergence, one writer per run folder

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, sft_steps=20, steps=20, batch_size=16, sft_examples=64,
            num_examples=64, eval_prompts=16, eval_every=10, checkpoint_every=10, warmup_steps=2, num_digits=3)


def quiet_run(config, out, **kwargs):
    return train.run(config, out, progress=False, log=lambda *a: None, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    quiet_run(train.TrainConfig(**TINY), out)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def one_line_error(capsys, code, argv):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _without_training_state(path):
    saved = checkpoint.load(path)
    checkpoint.save(path, saved.params, saved.config)


def _without_adamw_v(path):
    saved = checkpoint.load(path)
    adamw = {k: v for k, v in saved.extra["adamw"].items() if k != "v"}
    checkpoint.save(path, saved.params, saved.config, extra={**saved.extra, "adamw": adamw})


def _edit_config(run, **changes):
    path = run / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


DAMAGE = {
    "truncated kto.npz": (lambda run: _truncate(run / "checkpoints/kto.npz", 0.5), "kto.npz"),
    "zero-byte kto.npz": (lambda run: _truncate(run / "checkpoints/kto.npz", 0.0), "kto.npz"),
    "corrupt reference.npz": (lambda run: _flip_bytes(run / "checkpoints/reference.npz"), "reference.npz"),
    "truncated reference.npz": (lambda run: _truncate(run / "checkpoints/reference.npz", 0.7), "reference.npz"),
    "no training state": (lambda run: _without_training_state(run / "checkpoints/kto.npz"), "training state"),
    "no AdamW v": (lambda run: _without_adamw_v(run / "checkpoints/kto.npz"), "AdamW"),
    "record without phase": (lambda run: (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.5}\n' + (run / "metrics.jsonl").read_text()), "line 1"),
    "record not JSON": (lambda run: (run / "metrics.jsonl").write_text(
        "{oops\n" + (run / "metrics.jsonl").read_text()), "line 1"),
    "config.json not JSON": (lambda run: (run / "config.json").write_text("{"), "config.json"),
    "config.json a list": (lambda run: (run / "config.json").write_text("[1, 2]"), "config.json"),
    "config.json edited model": (lambda run: _edit_config(run, hidden_size=32), "different model"),
    "config.json bad value": (lambda run: _edit_config(run, beta=-1), "beta"),
    "config.json unknown key": (lambda run: _edit_config(run, lr_typo=1), "unknown keys"),
    "config.json fewer steps": (lambda run: _edit_config(run, steps=5), "beyond the 5 steps"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_run_folder_is_one_line_and_exit_2(run_copy, capsys, damage):
    make_damage, named = DAMAGE[damage]
    make_damage(run_copy)
    err = one_line_error(capsys, 2, ["demo", "--resume", "--quiet", "--out", str(run_copy)])
    assert named in err and str(run_copy) in err


def test_resume_drops_a_torn_last_metrics_line(tmp_path):
    config = train.TrainConfig(**TINY)
    quiet_run(config, tmp_path / "whole")
    quiet_run(config, tmp_path / "cut", stop_after=10)
    with open(tmp_path / "cut/metrics.jsonl", "a") as f:  # killed while appending step 11's record
        f.write('{"phase": "kto", "step": 11, "lo')
    quiet_run(config, tmp_path / "cut", resume=True)
    assert (tmp_path / "whole/metrics.jsonl").read_bytes() == (tmp_path / "cut/metrics.jsonl").read_bytes()


@pytest.mark.parametrize("damage", ["torn", "no phase", "reference"])
def test_figures_of_a_damaged_run_is_one_line_and_exit_2(run_copy, tmp_path, capsys, damage):
    if damage == "torn":
        with open(run_copy / "metrics.jsonl", "a") as f:
            f.write('{"phase": "kto", "st')
    elif damage == "no phase":
        (run_copy / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    else:
        _truncate(run_copy / "checkpoints/reference.npz", 0.5)
    err = one_line_error(capsys, 2, ["figures", "--run", str(run_copy), "--out", str(tmp_path / "figs")])
    assert "damaged" in err


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
def test_a_file_size_limit_during_a_run_is_one_line(tmp_path):
    out = tmp_path / "run"
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "from kto_np import cli\n"
            f"sys.exit(cli.main(['demo', '--quiet', '--sft-steps', '2', '--steps', '2', '--out', {str(out)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert "\n" not in err and "cannot write the run folder" in err and "too large" in err, err
    assert json.loads((out / "config.json").read_text())["steps"] == 2  # what was written is intact


@pytest.mark.parametrize("kwargs, quantity", [
    (dict(lr=1e10), "non-finite logits"),
    (dict(sft_lr=1e10), "non-finite logits"),
    (dict(lr=1e39, warmup_steps=0), "overflow to infinity"),
    (dict(beta=1e308), "beta=1e+308"),
    (dict(desirable_weight=1e308, undesirable_weight=1e308), "desirable_weight=1e+308"),
])
def test_divergence_is_named_with_its_step_and_quantity(tmp_path, kwargs, quantity):
    config = train.TrainConfig(**{**TINY, **kwargs})
    with pytest.raises(train.TrainingDiverged, match=r"(sft|kto) step \d+: ") as caught:
        quiet_run(config, tmp_path / "run")
    assert quantity in str(caught.value)


HOLDER = """
import sys, time
from kto_np import train
lock = train._RunLock(sys.argv[1] + "/.lock")
lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_folder_has_one_writer_and_a_killed_holder_does_not_block(run_copy):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (run_copy / "metrics.jsonl").read_bytes()
        for kwargs in (dict(resume=True), dict(force=True)):
            with pytest.raises(train.RunError, match=rf"in use by another run \(pid {holder.pid} on host "):
                quiet_run(train.TrainConfig(**TINY), run_copy, **kwargs)
        assert (run_copy / "metrics.jsonl").read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    quiet_run(train.TrainConfig(**TINY), run_copy, resume=True)  # the lock died with its holder
    assert (run_copy / "metrics.jsonl").read_bytes() == before


def test_two_runs_started_at_once_on_one_folder(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "kto_np", "demo", "--quiet", "--sft-steps", "30", "--steps", "5", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OPENBLAS_NUM_THREADS": "1"}
    runs = [subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
            for _ in range(2)]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    for r in runs:
        r.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another run (pid" in refused or "already holds a run" in refused, refused
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), "duplicated metric records"


# ----------------------------------------------------------------------------------------------
# item 10: command-line edges


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--bogus", "demo"], "unrecognized arguments: --bogus"),
    ([], "required: COMMAND"),
    (["demo", "--out", ""], "--out must be a folder name"),
    (["figures", "--out", ""], "--out must be a folder name"),
])
def test_command_line_edges_are_one_named_error(capsys, argv, message):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_during_the_imports_is_not_a_traceback(capsys, monkeypatch):
    # the package imports nothing heavy before main() runs: kto-np's console script imports kto_np.cli
    done = subprocess.run([sys.executable, "-c", "import sys, kto_np.cli; print(sorted({'numpy', 'kto_np.model'} "
                           "& set(sys.modules)))"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.stdout.strip() == "[]", done.stdout + done.stderr

    def interrupted():
        raise KeyboardInterrupt  # as if Ctrl-C came while build_parser imports the subcommands

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["gradcheck"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_the_package_names_still_import():
    import kto_np  # noqa: PLC0415

    assert set(kto_np.__all__) <= set(dir(kto_np))
    for name in kto_np.__all__:
        assert getattr(kto_np, name) is not None
    assert kto_np.losses.kto_loss is kto_np.kto_loss
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        kto_np.bogus  # noqa: B018


# ----------------------------------------------------------------------------------------------
# item 9: the same numbers whatever the number of BLAS threads

THREADS_RUN = """
import hashlib, sys
import numpy as np
from kto_np import optim, step
from kto_np.data import Tokenizer, collate, make_examples, make_task
from kto_np.architectures import build
for dtype in ("float32", "float64"):
    batch = collate(make_examples(make_task("sort", 4), 32, seed=0), Tokenizer(), dtype=dtype)
    model = build(hidden_size=64, num_layers=2, num_heads=4, vocab_size=Tokenizer().vocab_size, max_seq_len=12,
                  dtype=dtype)
    params = model.init(0)
    state = optim.adamw_init(params)
    for _ in range(3):  # what train.run does per step: loss, clip, AdamW
        loss, _, grads = step.sft_step(model, params, batch)
        norm = optim.clip_grad_norm(grads, 0.5)
        optim.adamw_step(params, grads, state, lr=1e-2)
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(params[k]).tobytes() for k in sorted(params)))
        print(dtype, repr(loss), repr(norm), digest.hexdigest())
"""


def test_metrics_and_parameters_do_not_depend_on_the_blas_thread_count():
    runs = []
    for threads in (1, 2):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OPENBLAS_NUM_THREADS": str(threads),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        runs.append(subprocess.Popen([sys.executable, "-c", THREADS_RUN], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    outputs = []
    for r in runs:
        out, err = r.communicate(timeout=300)
        assert r.returncode == 0, err[-2000:]
        outputs.append(out.splitlines())
    assert len(outputs[0]) == 6
    for one, two in zip(*outputs):
        assert one == two, f"1 BLAS thread: {one}; 2 threads: {two}"


# ----------------------------------------------------------------------------------------------
# item 7: bounded work for crafted files


def _tiny_checkpoint(path):
    model = build(hidden_size=8, num_layers=1, num_heads=2, vocab_size=11, dropout=0.0, max_seq_len=8)
    checkpoint.save(path, model.init(0), model.config)
    return path


def _rewrite(source, target, *, config_changes=None, add=None):
    """Copy an .npz, editing its config JSON, then append the entries `add` {name: (header_shape, data_bytes)}."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if config_changes and info.filename == checkpoint.CONFIG_KEY + ".npy":
                config = json.loads(str(np.load(io.BytesIO(data))[()]))
                buffer = io.BytesIO()
                np.save(buffer, np.array(json.dumps({**config, **config_changes})))
                data = buffer.getvalue()
            dst.writestr(info.filename, data)
        for name, (shape, nbytes) in (add or {}).items():
            info = zipfile.ZipInfo(name + ".npy", date_time=files.ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(info, "w", force_zip64=True) as f:
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
                f.write(header.getvalue())
                for start in range(0, nbytes, 1 << 22):
                    f.write(bytes(min(1 << 22, nbytes - start)))
    return target


@pytest.mark.parametrize("layers", [10**6, 4096])
def test_a_crafted_config_is_refused_before_any_array_is_read(tmp_path, layers):
    crafted = _rewrite(_tiny_checkpoint(tmp_path / "tiny.npz"), tmp_path / "crafted.npz",
                       config_changes={"num_layers": layers})
    assert crafted.stat().st_size < 20_000
    started = time.perf_counter()
    with pytest.raises(checkpoint.CheckpointError, match="num_layers must be <= 4096|missing keys"):
        checkpoint.load(crafted)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("entry, match", [
    ({"zzz_unknown": ((1 << 24,), 1 << 26)}, "unexpected keys"),  # 64 MiB of zeros, declared honestly
    ({"extra/bomb": ((1 << 24,), 1 << 26)}, "extra arrays declare"),
    ({"extra/liar": ((2,), 1 << 26)}, "header declares"),  # a header that understates its data
])
def test_a_deflate_bomb_costs_no_more_than_its_header(tmp_path, entry, match):
    bomb = _rewrite(_tiny_checkpoint(tmp_path / "tiny.npz"), tmp_path / "bomb.npz", add=entry)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(checkpoint.CheckpointError, match=match):
            checkpoint.load(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"reading the crafted file took {peak / 2**20:.0f} MiB"


def test_npz_archive_reads_headers_first_and_arrays_exactly(tmp_path):
    path = tmp_path / "a.npz"
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    np.savez(path, a=fortran, s=np.array("text"), i=np.arange(4, dtype=np.int16))
    with files.NpzArchive(str(path)) as npz:
        assert {k: (h.shape, str(h.dtype)) for k, h in npz.headers.items()} == {
            "a": ((2, 3), "float64"), "s": ((), "<U4"), "i": ((4,), "int16")}
        np.testing.assert_array_equal(npz.read("a"), fortran)
        assert str(npz.read("s")) == "text"
        with pytest.raises(files.ArchiveError, match="more than the 4 allowed"):
            npz.read("i", max_bytes=4)
    np.savez(tmp_path / "o.npz", o=np.array([None, 1], dtype=object))
    with pytest.raises(files.ArchiveError, match="nothing is unpickled"):
        files.NpzArchive(str(tmp_path / "o.npz"))


def test_numpy_scalars_are_plain_numbers_and_a_string_array_is_no_number(tmp_path):
    model = build(hidden_size=8, num_layers=np.int64(1), num_heads=np.int32(2), vocab_size=np.uint8(11),
                  dropout=np.float32(0.1), max_seq_len=np.int64(8))
    assert type(model.config.dropout) is float and type(model.config.num_layers) is int
    checkpoint.save(tmp_path / "m.npz", model.init(0), model.config)  # JSON takes the config
    assert checkpoint.load(tmp_path / "m.npz").config == model.config
    from kto_np.losses import KTOConfig  # noqa: PLC0415

    with pytest.raises(TypeError, match="beta must be a real number"):
        KTOConfig(beta=np.array("0.1"))
    with pytest.raises(ValueError, match="beta must be finite"):
        KTOConfig(beta=10**400)
    with pytest.raises(TypeError, match="beta must be a real number"):
        KTOConfig(beta=np.complex128(0.1))
