"""kto_np's CuPy path on every run, without a GPU: the backend switch picks tests/strict_cupy.py, a CPU
stand-in that raises where CuPy raises (an implicit device-to-host conversion, a NumPy array mixed into a
device operation). The model (both editions), the losses, the training steps, generation, the fast ops,
AdamW and clipping, a tiny training run and the benchmark run on it, and their numbers are compared with
the NumPy backend's. Real CuPy on a GPU is tests/test_cupy.py."""

import json

import numpy as np
import pytest
import strict_cupy

from kto_np import backend, cli, losses, optim, step, train
from kto_np import layers as reading_layers
from kto_np import logprobs as reading_logprobs
from kto_np.architectures import build
from kto_np.fast import layers as fast_layers
from kto_np.fast import logprobs as fast_logprobs
from kto_np.fast import optim as fast_optim
from kto_np.generate import generate

RTOL = 1e-12  # float64 throughout: the stand-in runs NumPy's own kernels, so only rounding may differ
OPTIMIZERS = {"reading": optim, "fast": fast_optim}


@pytest.fixture
def cupy(monkeypatch):
    """The stand-in, registered as `cupy`/`cupyx` and selected as kto_np's backend; numpy afterwards."""
    module = strict_cupy.install(monkeypatch)
    assert backend.set_backend("cupy") is module
    strict_cupy.reset_counters()
    yield module
    backend.set_backend("numpy")


def on_device(value) -> bool:
    return isinstance(value, strict_cupy.ndarray)


def assert_same(name, on_host, on_gpu):
    """on_gpu (device arrays, nested in tuples/lists/dicts) equals on_host (NumPy) to float rounding; every
    array that is a NumPy array on the host side is a device array on the other."""
    if isinstance(on_host, dict):
        assert list(on_gpu) == list(on_host), name
        for key in on_host:
            assert_same(f"{name}[{key!r}]", on_host[key], on_gpu[key])
    elif isinstance(on_host, (tuple, list)):
        assert len(on_gpu) == len(on_host), name
        for i, (a, b) in enumerate(zip(on_host, on_gpu)):
            assert_same(f"{name}[{i}]", a, b)
    elif isinstance(on_host, np.ndarray):
        assert on_device(on_gpu), f"{name}: a {type(on_gpu)} on the cupy backend, not a device array"
        on_gpu = on_gpu.get()
        assert on_gpu.dtype == on_host.dtype and on_gpu.shape == on_host.shape, name
        np.testing.assert_allclose(on_gpu, on_host, rtol=RTOL, atol=1e-300, err_msg=name)
    elif isinstance(on_host, float):
        assert type(on_gpu) is float and on_gpu == pytest.approx(on_host, rel=RTOL, abs=1e-300), name
    else:
        assert on_gpu == on_host, name


def to_device(value, xp):
    """value's NumPy arrays copied into module xp (numpy or the stand-in): each run gets its own copy."""
    if isinstance(value, np.ndarray):
        return xp.array(value)
    if isinstance(value, dict):
        return {k: to_device(v, xp) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(to_device(v, xp) for v in value)
    return value


# ----------------------------------------------------------------------------------------------
# the stand-in is as strict as CuPy (so that kto_np passing on it means something)


def test_what_cupy_refuses_raises(cupy):
    for name, operation in strict_cupy.refused(cupy).items():
        with pytest.raises(TypeError):
            operation()
            pytest.fail(f"{name}: no TypeError (CuPy raises one)")
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(cupy.ones(2))  # CuPy's own message
    with pytest.raises(ValueError, match="ambiguous"):
        bool(cupy.ones(2))


def test_what_cupy_allows_is_allowed(cupy):
    failed = [name for name, operation in strict_cupy.allowed(cupy).items() if operation() is not True]
    assert not failed
    x = cupy.asarray(np.zeros(3))
    assert cupy.asarray(x) is x
    x.get()[0] = 1.0  # .get() is a copy
    assert float(x[0]) == 0.0
    strict_cupy.reset_counters()
    x[np.array([0, 2])]
    assert strict_cupy.uploads == 1  # a host index array is copied to the device (counted)


def test_the_backend_switch_picks_the_stand_in(cupy, monkeypatch):
    x = cupy.ones(3)
    assert backend.get_backend() == "cupy" and backend.xp() is cupy
    assert backend.array_module(np.ones(2), x) is cupy and backend.array_module(np.ones(2)) is np
    assert on_device(backend.asarray(np.ones(2))) and backend.to_module(x, np) .tolist() == [1.0, 1.0, 1.0]
    monkeypatch.setitem(backend._state, "name", None)
    monkeypatch.setenv("KTO_NP_BACKEND", "cupy")
    assert backend.get_backend() == "cupy" and backend.xp() is cupy
    target = cupy.zeros((4, 2))
    backend.scatter_add(target, cupy.asarray(np.array([[0, 3], [0, 1]])), cupy.ones((2, 2, 2)))
    assert target.get().tolist() == [[2, 2], [1, 1], [0, 0], [1, 1]]


# ----------------------------------------------------------------------------------------------
# kto_np on the stand-in, against the NumPy backend


def tiny_model(fast, dropout=0.0):
    return build(hidden_size=16, num_layers=2, num_heads=2, vocab_size=23, dropout=dropout, max_seq_len=12,
                 dtype="float64", fast=fast)


def tiny_batch():
    return step.make_batch([[1, 2], [3], [4, 5, 6], [7]], [[8, 9], [10, 11, 12], [13], [14, 15]], [1, 0, 1, 0],
                           dtype="float64")


def on_both(run):
    """run() on the NumPy backend, then on the cupy backend (the stand-in): (host result, device result)."""
    backend.set_backend("numpy")
    on_host = run()
    backend.set_backend("cupy")
    return on_host, run()


@pytest.mark.parametrize("fast", [False, True], ids=["reading", "fast"])
def test_model_forward_and_backward(cupy, fast):
    model = tiny_model(fast)

    def run():
        params = model.init(0)
        logits, cache = model.forward(params, tiny_batch().tokens)
        dlogits = backend.asarray(np.random.default_rng(1).standard_normal(logits.shape))
        return logits, model.backward(dlogits, cache)

    assert_same("model", *on_both(run))
    assert strict_cupy.uploads == 0


@pytest.mark.parametrize("fast", [False, True], ids=["reading", "fast"])
@pytest.mark.parametrize("variant", losses.VARIANTS)
def test_kto_and_sft_steps(cupy, fast, variant):
    model = tiny_model(fast, dropout=0.1)
    config = losses.KTOConfig(variant=variant)

    def run():
        params, batch = model.init(0), tiny_batch()
        ref = step.reference_logps(model, model.init(1), batch)
        kto = step.kto_step(model, params, batch, *ref, config, train=True, rng=np.random.default_rng(2))
        sft = step.sft_step(model, params, batch, train=True, rng=np.random.default_rng(3))
        return ref, kto, sft

    assert_same("steps", *on_both(run))
    assert strict_cupy.uploads == 0


@pytest.mark.parametrize("fast", [False, True], ids=["reading", "fast"])
def test_kto_step_brings_host_inputs_to_the_device(cupy, fast):
    """Reference log-probs computed on the host and a batch built on the host join the device policy (an
    explicit copy at the door), instead of a NumPy/CuPy mix deep inside the step."""
    model = tiny_model(fast)
    config = losses.KTOConfig()
    backend.set_backend("numpy")
    host_batch = tiny_batch()
    host_ref = step.reference_logps(model, model.init(1), host_batch)
    expected = step.kto_step(model, model.init(0), host_batch, *host_ref, config)
    backend.set_backend("cupy")
    params = model.init(0)
    strict_cupy.reset_counters()
    assert_same("host references", expected, step.kto_step(model, params, tiny_batch(), *host_ref, config))
    assert_same("host batch", expected, step.kto_step(model, params, host_batch, *host_ref, config))
    host_params = {name: value.get() for name, value in params.items()}
    assert_same("sft, host batch", step.sft_step(model, host_params, host_batch),
                step.sft_step(model, params, host_batch))
    assert strict_cupy.uploads == 0  # moved once, explicitly, not re-uploaded by every indexing


@pytest.mark.parametrize("variant", losses.VARIANTS)
def test_losses(cupy, variant):
    rng = np.random.default_rng(4)
    policy, ref, kl_policy, kl_ref = (rng.normal(-5.0, 1.0, 6) for _ in range(4))
    labels = np.array([1, 0, 1, 1, 0, 0])
    kl = dict(kl_policy_logps=kl_policy, kl_ref_logps=kl_ref) if variant == "kto" else {}
    args = (policy, ref, labels)
    expected = losses.kto_loss_and_grad(*args, variant=variant, **kl)
    device = to_device((args, kl), cupy)
    assert_same("kto_loss_and_grad", expected, losses.kto_loss_and_grad(*device[0], variant=variant, **device[1]))
    assert losses.kto_loss(*device[0], variant=variant, **device[1]) == pytest.approx(expected[0], rel=RTOL)
    mixed = losses.kto_loss_and_grad(device[0][0], ref, labels, variant=variant, **kl)  # host ref: moved
    assert_same("kto_loss_and_grad, host ref_logps", expected, mixed)


@pytest.mark.parametrize("fast", [False, True], ids=["reading", "fast"])
def test_generate(cupy, fast):
    model = tiny_model(fast)

    def run():
        params, prompt = model.init(0), tiny_batch().tokens[:, :3]
        greedy = generate(model, params, prompt, 4)
        sampled = generate(model, params, prompt, 4, temperature=1.0, top_k=5, rng=np.random.default_rng(5),
                           stop_token=13)
        return greedy, sampled

    greedy, sampled = on_both(run)
    for host, device in zip(greedy, sampled):
        assert type(device) is np.ndarray and np.array_equal(host, device)  # generate returns host tokens


OPS = {
    "linear": (lambda r: (r.standard_normal((2, 3, 4)), r.standard_normal((4, 5)), r.standard_normal(5)), (2, 3, 5)),
    "layernorm": (lambda r: (r.standard_normal((2, 3, 4)), r.standard_normal(4), r.standard_normal(4)), (2, 3, 4)),
    "gelu": (lambda r: (r.standard_normal((2, 3, 4)),), (2, 3, 4)),
    "softmax": (lambda r: (r.standard_normal((2, 3, 4)), np.tri(3, 4, k=1, dtype=bool)), (2, 3, 4)),
    "attention": (lambda r: (r.standard_normal((2, 3, 4)), r.standard_normal((4, 12)), r.standard_normal(12),
                             r.standard_normal((4, 4)), r.standard_normal(4), 2), (2, 3, 4)),
}


@pytest.mark.parametrize("edition", [reading_layers, fast_layers], ids=["reading", "fast"])
@pytest.mark.parametrize("op", OPS)
def test_layer_ops(cupy, edition, op):
    make_inputs, out_shape = OPS[op]
    forward, backward = getattr(edition, f"{op}_forward"), getattr(edition, f"{op}_backward")
    inputs = make_inputs(np.random.default_rng(6))
    dout = np.random.default_rng(7).standard_normal(out_shape)

    def run(xp):
        out, cache = forward(*to_device(inputs, xp))
        return out, backward(to_device(dout, xp), cache)

    assert_same(op, run(np), run(cupy))


@pytest.mark.parametrize("edition", [reading_logprobs, fast_logprobs], ids=["reading", "fast"])
def test_logprob_ops(cupy, edition):
    rng = np.random.default_rng(8)
    logits, tokens, mask = rng.standard_normal((3, 5, 7)), rng.integers(0, 7, (3, 5)), rng.random((3, 5)) > 0.3
    dlogps = rng.standard_normal(3)

    def run(xp):
        args = to_device((logits, tokens, mask.astype(np.float64)), xp)
        logps, cache = edition.sequence_logprobs_forward(*args)
        forward, backward = edition.logprobs_forward, edition.logprobs_backward
        flat, flat_cache = forward(*args)
        return (logps, edition.sequence_logprobs_backward(to_device(dlogps, xp), cache), flat,
                backward(to_device(dlogps, xp), flat_cache), edition.log_softmax(args[0]))

    assert_same("log-probs", run(np), run(cupy))


@pytest.mark.parametrize("edition", OPTIMIZERS)
def test_adamw_and_clipping(cupy, edition):
    rng = np.random.default_rng(9)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = {k: 3.0 * rng.standard_normal(v.shape) for k, v in params.items()}
    module = OPTIMIZERS[edition]

    def run(xp):
        p, g = to_device({k: v.copy() for k, v in params.items()}, xp), to_device(grads, xp)
        state = optim.adamw_init(p)
        norm = module.clip_grad_norm(g, 1.0)
        for _ in range(2):
            module.adamw_step(p, g, state, lr=1e-2, weight_decay=0.1)
        return norm, p, state["m"], state["v"]

    assert_same("AdamW", run(np), run(cupy))
    # host gradients for device params: the reading edition refuses them at its door, by name; the fast
    # edition checks nothing (its callers did) and meets CuPy's own error
    device_params = to_device(params, cupy)
    with pytest.raises(TypeError, match="grads" if edition == "reading" else "Unsupported type"):
        module.adamw_step(device_params, grads, optim.adamw_init(device_params), lr=1e-2)


def test_a_tiny_training_run(cupy, tmp_path):
    config = dict(hidden_size=16, num_layers=1, num_heads=2, sft_steps=3, steps=3, batch_size=4, sft_examples=8,
                  num_examples=8, eval_prompts=4, eval_every=2, checkpoint_every=2, warmup_steps=1, num_digits=3,
                  dtype="float64")
    records = {}
    for name in ("numpy", "cupy"):
        before = backend.get_backend()
        train.run(train.TrainConfig(**config, backend=name), tmp_path / name, progress=False, log=lambda *a: None)
        assert backend.get_backend() == before  # a run gives the process its backend back
        with open(tmp_path / name / "metrics.jsonl") as f:
            records[name] = [json.loads(line) for line in f]
    assert strict_cupy.syncs > 0  # the cupy run did run on the stand-in
    assert len(records["cupy"]) == len(records["numpy"]) > 0
    for host, device in zip(records["numpy"], records["cupy"]):
        assert device.keys() == host.keys()
        for key, value in host.items():
            if isinstance(value, float):
                assert device[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            elif key != "seconds":
                assert device[key] == value, key


def test_kto_np_bench_backend_cupy_tiny(cupy, capsys):
    backend.set_backend("numpy")
    assert cli.main(["bench", "--backend", "cupy", "--tiny", "--repeats", "2", "--warmup", "1", "--no-memory",
                     "--no-torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: numpy "), out
    assert strict_cupy.syncs > 0 and backend.get_backend() == "numpy"
