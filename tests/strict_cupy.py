"""A CPU stand-in for CuPy with CuPy's strictness about host memory, for tests without a GPU.

Its `ndarray` wraps a NumPy array (the "device" memory) and behaves as `cupy.ndarray` does where
host and device meet (CuPy's cupy/_core/core.pyx, _kernel.pyx, _routines_indexing.pyx):

- Implicit conversion to NumPy raises TypeError: `numpy.asarray(x)`, `numpy.array(x)`, and any NumPy
  function that converts its argument (`__array__`). The explicit ways out are `x.get()`,
  `cupy.asnumpy(x)` and, for one element, `float(x)`, `int(x)`, `bool(x)`, `complex(x)`, `x.item()`,
  `x.tolist()`, `repr`/`str`/`format` (allowed by CuPy: they synchronise). `x.__index__` does not
  exist (CuPy has none), so `range(x)` or `list[x]` of a 0-d array is a TypeError.
- A `numpy.ndarray` (of any shape, 0-d included) among the arguments of an operator, a ufunc or a
  function of this module raises TypeError ("Unsupported type"), whichever side it is on:
  `x + numpy_array`, `numpy_array * x`, `cupy.where(x > 0, numpy_array, x)`, `cupy.exp(numpy_array)`,
  `out=numpy_array`. Python and NumPy scalars (`numpy.float32(1)`) are accepted, as CuPy does.
  Comparisons accept a 0-d NumPy array (CuPy unwraps it with .item()).
- `cupy.asarray(numpy_array)` / `cupy.array(...)` is the explicit host-to-device copy. Indexing with a
  NumPy integer/boolean array and assigning a NumPy array into a slice are accepted (CuPy copies them to
  the device); `uploads` counts those implicit copies, so a test can require there are none.
- NumPy functions and ufuncs called on these arrays dispatch to this module (`__array_function__`,
  `__array_ufunc__`), as for CuPy: `numpy.exp(x)` gives an `ndarray` of this module; a NumPy function
  this module does not provide raises TypeError ("no implementation found").
- Reductions and scalar indexing return 0-d arrays, never NumPy scalars; ufuncs take only `out`,
  `dtype` and `casting`; reductions take no `where`/`initial` (CuPy has neither).
- `cupyx.scatter_add`, `cuda.Device().synchronize()`, `cuda.runtime.getDeviceCount()`,
  `get_default_memory_pool()`: enough of the rest for kto_np's backend and benchmark.

`install(monkeypatch)` registers the stand-in as the modules `cupy` and `cupyx`, so that
`kto_np.backend.set_backend("cupy")` and `backend.array_module` pick it with kto_np's code unmodified.
"""

from __future__ import annotations

import functools
import sys
import types

import numpy

__version__ = "0.0.0+strict-stand-in"

_SCALAR_TYPES = (bool, int, float, complex, numpy.generic)

# counters a test may read (reset with reset_counters): NumPy data copied to the device implicitly
# (indices, assigned values) and device data read back on the host (get, asnumpy, float, bool, item...)
uploads = 0
syncs = 0


def reset_counters() -> None:
    global uploads, syncs
    uploads = syncs = 0


def _count_upload() -> None:
    global uploads
    uploads += 1


def _count_sync() -> None:
    global syncs
    syncs += 1


def _unsupported(value, where: str) -> TypeError:
    return TypeError(f"Unsupported type {type(value)} in {where}: CuPy does not mix numpy.ndarray with "
                     "cupy.ndarray (copy it explicitly with cupy.asarray / .get())")


def _device(value, where: str):
    """An argument of a device operation as the NumPy array inside it; numpy.ndarray is refused."""
    if isinstance(value, ndarray):
        return value._data
    if isinstance(value, numpy.ndarray):
        raise _unsupported(value, where)
    if isinstance(value, (list, tuple)):
        return type(value)(_device(v, where) for v in value)
    return value


def _wrap(result):
    """A NumPy result as device arrays: arrays and NumPy scalars become ndarray (0-d for scalars)."""
    if isinstance(result, numpy.ndarray):
        return ndarray._from_host(result)
    if isinstance(result, numpy.generic):
        return ndarray._from_host(numpy.asarray(result))
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, list):
        return [_wrap(r) for r in result]
    return result


def _index(key):
    """An index: device arrays unwrapped; NumPy arrays accepted as CuPy does (an implicit upload)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._data
    if isinstance(key, numpy.ndarray) or (isinstance(key, list) and any(isinstance(k, numpy.ndarray)
                                                                        for k in key)):
        _count_upload()
    return key


def _uploaded(value):
    """An index argument: a NumPy array is copied to the device (counted), as CuPy's indexing does."""
    if isinstance(value, numpy.ndarray):
        _count_upload()
        return ndarray._from_host(value)
    return value


def _call(func, name: str, args, kwargs, *, forbidden=()):
    """func(*args, **kwargs) on the NumPy arrays inside; `out=` returns the given device array."""
    for key in forbidden:
        if key in kwargs:
            raise TypeError(f"{name}() got an unexpected keyword argument {key!r} (not supported by CuPy)")
    out = kwargs.get("out")
    if out is not None and not isinstance(out, ndarray):
        raise TypeError(f"{name}(): out must be a cupy.ndarray, got {type(out)}")
    result = func(*_device(args, name), **{k: _device(v, name) for k, v in kwargs.items()})
    return out if out is not None else _wrap(result)


# ----------------------------------------------------------------------------------------------
# the array


class ndarray:  # noqa: N801  (CuPy's name)
    """A device array: a NumPy array that refuses to meet NumPy implicitly."""

    __slots__ = ("_data",)
    __module__ = "cupy"  # kto_np.backend recognises CuPy arrays by their type's module
    __hash__ = None

    def __init__(self, shape, dtype=float, order="C"):
        self._data = numpy.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _from_host(cls, data: numpy.ndarray) -> ndarray:
        array = cls.__new__(cls)
        array._data = data
        return array

    # -- host and device

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        _count_sync()
        if out is not None:
            out[...] = self._data
            return out
        return numpy.array(self._data, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("Shape and dtype mismatch")
        self._data[...] = arr

    def item(self):
        _count_sync()
        return self._data.item()

    def tolist(self):
        _count_sync()
        return self._data.tolist()

    def __float__(self):
        _count_sync()
        return float(self._data)

    def __int__(self):
        _count_sync()
        return int(self._data)

    def __complex__(self):
        _count_sync()
        return complex(self._data)

    def __bool__(self):
        if self.size > 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        _count_sync()
        return bool(self._data)

    def __repr__(self):
        _count_sync()
        return repr(self._data)

    def __str__(self):
        _count_sync()
        return str(self._data)

    def __format__(self, format_spec):
        _count_sync()
        return format(self._data, format_spec)

    # -- NumPy's protocols: NumPy functions on device arrays run here

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        func = _UFUNCS.get(ufunc.__name__)
        if func is None:
            return NotImplemented
        if "out" in kwargs:
            out = kwargs["out"]
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kwargs["out"] = out[0]
        for x in inputs + ((kwargs["out"],) if "out" in kwargs else ()):
            if not isinstance(x, (_SCALAR_TYPES, ndarray, numpy.ndarray)):
                return NotImplemented
        if ufunc.__name__ in _COMPARISONS:
            inputs = tuple(x.item() if isinstance(x, numpy.ndarray) and x.ndim == 0 else x for x in inputs)
        if method == "__call__":
            return func(*inputs, **kwargs)
        if method in ("reduce", "accumulate", "outer", "at"):
            return getattr(func, method)(*inputs, **kwargs)
        return NotImplemented

    def __array_function__(self, func, types, args, kwargs):
        module = sys.modules[__name__]
        for part in func.__module__.split(".")[1:]:
            module = getattr(module, part, None)
        ours = getattr(module, func.__name__, None)
        if ours is None or ours is func:
            return NotImplemented
        if not all(issubclass(t, (ndarray, numpy.ndarray)) for t in types):
            return NotImplemented
        return ours(*args, **kwargs)

    # -- attributes

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    nbytes = property(lambda self: self._data.nbytes)
    itemsize = property(lambda self: self._data.itemsize)
    strides = property(lambda self: self._data.strides)
    flags = property(lambda self: self._data.flags)
    T = property(lambda self: _wrap(self._data.T))
    device = property(lambda self: _DEVICE)

    def __len__(self):
        return len(self._data)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    # -- indexing

    def __getitem__(self, key):
        return _wrap(self._data[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, numpy.ndarray):
            _count_upload()  # CuPy copies it to the device
        elif isinstance(value, ndarray):
            value = value._data
        self._data[_index(key)] = value

    # -- operators: a numpy.ndarray operand raises, as in CuPy

    def _binary(self, ufunc, other, reflected=False):
        if isinstance(other, numpy.ndarray):
            raise _unsupported(other, f"operator {ufunc.__name__}")
        if not isinstance(other, (ndarray, *_SCALAR_TYPES)):
            return NotImplemented
        args = (other, self) if reflected else (self, other)
        return _UFUNCS[ufunc.__name__](*args)

    def _inplace(self, ufunc, other):
        if isinstance(other, numpy.ndarray):
            raise _unsupported(other, f"operator {ufunc.__name__}")
        _UFUNCS[ufunc.__name__](self, other, out=self)
        return self

    def _compare(self, ufunc, other):
        if isinstance(other, numpy.ndarray) and other.ndim == 0:
            other = other.item()
        return self._binary(ufunc, other)

    def __neg__(self):
        return _UFUNCS["negative"](self)

    def __pos__(self):
        return _UFUNCS["positive"](self)

    def __abs__(self):
        return _UFUNCS["absolute"](self)

    def __invert__(self):
        return _UFUNCS["invert"](self)

    # -- methods (CuPy's set; arguments may not be numpy arrays)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and numpy.dtype(dtype) == self.dtype:
            return self
        return _wrap(self._data.astype(dtype, order=order, casting=casting or "unsafe", copy=True))

    def copy(self, order="C"):
        return _wrap(self._data.copy(order=order))

    def fill(self, value):
        if isinstance(value, numpy.ndarray):
            raise _unsupported(value, "fill")
        self._data.fill(_device(value, "fill"))

    def take(self, indices, axis=None, out=None):
        return take(self, indices, axis, out)

    def view(self, *args, **kwargs):
        return _wrap(self._data.view(*args, **kwargs))


for _name, _ufunc in (("add", numpy.add), ("sub", numpy.subtract), ("mul", numpy.multiply),
                      ("truediv", numpy.true_divide), ("floordiv", numpy.floor_divide), ("mod", numpy.remainder),
                      ("pow", numpy.power), ("matmul", numpy.matmul), ("and", numpy.bitwise_and),
                      ("or", numpy.bitwise_or), ("xor", numpy.bitwise_xor), ("lshift", numpy.left_shift),
                      ("rshift", numpy.right_shift)):
    setattr(ndarray, f"__{_name}__", functools.partialmethod(ndarray._binary, _ufunc))
    setattr(ndarray, f"__r{_name}__", functools.partialmethod(ndarray._binary, _ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", functools.partialmethod(ndarray._inplace, _ufunc))
for _name, _ufunc in (("lt", numpy.less), ("le", numpy.less_equal), ("gt", numpy.greater),
                      ("ge", numpy.greater_equal), ("eq", numpy.equal), ("ne", numpy.not_equal)):
    setattr(ndarray, f"__{_name}__", functools.partialmethod(ndarray._compare, _ufunc))


def _method(name: str, forbidden=()):
    def method(self, *args, **kwargs):
        return _call(getattr(self._data, name), f"ndarray.{name}", args, kwargs, forbidden=forbidden)

    method.__name__ = name
    return method


_NO_WHERE = ("where", "initial")
for _name in ("reshape", "ravel", "flatten", "transpose", "swapaxes", "squeeze", "repeat", "clip",
              "nonzero", "argmax", "argmin", "cumsum", "dot", "conj", "round", "sort", "argsort", "partition",
              "argpartition", "diagonal", "trace", "choose", "compress", "put"):
    setattr(ndarray, _name, _method(_name))
for _name in ("sum", "mean", "var", "std", "prod", "max", "min", "any", "all"):
    setattr(ndarray, _name, _method(_name, _NO_WHERE))
del _name


# ----------------------------------------------------------------------------------------------
# ufuncs


_COMPARISONS = ("greater", "greater_equal", "less", "less_equal", "equal", "not_equal")


class _Ufunc:
    """A NumPy ufunc on device arrays, with CuPy's keywords (out, dtype, casting)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__
        self.nin, self.nout = ufunc.nin, ufunc.nout

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"

    def __call__(self, *args, out=None, dtype=None, casting="same_kind"):
        kwargs = {"casting": casting, **({} if dtype is None else {"dtype": dtype})}
        if out is not None:
            kwargs["out"] = out
        return _call(self._ufunc, self.__name__, args, kwargs)

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        return _call(self._ufunc.reduce, f"{self.__name__}.reduce", (array,),
                     {"axis": axis, "dtype": dtype, "out": out, "keepdims": keepdims})

    def accumulate(self, array, axis=0, dtype=None, out=None):
        return _call(self._ufunc.accumulate, f"{self.__name__}.accumulate", (array,),
                     {"axis": axis, "dtype": dtype, "out": out})

    def outer(self, a, b, **kwargs):
        return _call(self._ufunc.outer, f"{self.__name__}.outer", (a, b), kwargs)

    def at(self, a, indices, b=None):
        if not isinstance(a, ndarray):
            raise TypeError(f"{self.__name__}.at: the target must be a cupy.ndarray, got {type(a)}")
        args = (indices,) if b is None else (indices, b)
        self._ufunc.at(a._data, *_device(args, f"{self.__name__}.at"))


_UFUNC_NAMES = (
    "add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "remainder", "mod", "power",
    "negative", "positive", "absolute", "abs", "sign", "exp", "exp2", "expm1", "log", "log2", "log10",
    "log1p", "sqrt", "square", "reciprocal", "tanh", "sinh", "cosh", "sin", "cos", "tan", "arctan",
    "floor", "ceil", "trunc", "rint", "maximum", "minimum", "fmax", "fmin", "copysign", "logaddexp",
    "isfinite", "isnan", "isinf", "signbit", "logical_and", "logical_or", "logical_not", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_xor", "invert", "left_shift", "right_shift", "matmul",
    *_COMPARISONS,
)
_UFUNCS = {getattr(numpy, name).__name__: _Ufunc(getattr(numpy, name)) for name in _UFUNC_NAMES}
globals().update({name: _UFUNCS[getattr(numpy, name).__name__] for name in _UFUNC_NAMES})


# ----------------------------------------------------------------------------------------------
# functions


def _function(name: str, forbidden=()):
    numpy_function = getattr(numpy, name)

    def function(*args, **kwargs):
        return _call(numpy_function, name, args, kwargs, forbidden=forbidden)

    function.__name__ = function.__qualname__ = name
    return function


_FUNCTION_NAMES = (
    "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like", "arange", "linspace",
    "eye", "identity", "tri", "tril", "triu", "indices", "concatenate", "stack", "hstack", "vstack", "split",
    "reshape", "ravel", "transpose", "swapaxes", "moveaxis", "expand_dims", "squeeze", "broadcast_to",
    "where", "einsum", "dot", "tensordot", "outer", "clip",
    "argmax", "argmin", "cumsum", "sort", "argsort", "partition", "argpartition", "count_nonzero", "nonzero",
    "flatnonzero",
    "isin", "unique", "allclose", "isclose", "array_equal", "round", "around", "diff", "tile", "repeat",
    "flip", "roll", "atleast_1d", "atleast_2d", "result_type", "copyto", "shape", "ndim", "size",
)
for _name in _FUNCTION_NAMES:
    globals()[_name] = _function(_name)
for _name in ("sum", "mean", "var", "std", "prod", "max", "min", "amax", "amin", "any", "all"):
    globals()[_name] = _function(_name, _NO_WHERE)
del _name


def take(a, indices, axis=None, out=None):
    """Fancy indexing along one axis; NumPy indices are uploaded, as CuPy's indexing does."""
    return _call(numpy.take, "take", (a, _uploaded(indices), axis), {"out": out})


def take_along_axis(a, indices, axis):
    """NumPy indices are uploaded, as CuPy's take_along_axis (built on indexing) does."""
    return _call(numpy.take_along_axis, "take_along_axis", (a, _uploaded(indices), axis), {})


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0):
    """A new device array; a NumPy array or nested sequence is copied from the host (explicit)."""
    if isinstance(obj, ndarray):
        obj = obj._data
    elif isinstance(obj, (list, tuple)):
        obj = _host_sequence(obj)
    data = numpy.array(obj, dtype=dtype, copy=True if copy else None, order=order, ndmin=ndmin)
    if isinstance(obj, numpy.ndarray) and data is obj and copy is not False:
        data = data.copy()
    return ndarray._from_host(data)


def _host_sequence(obj):
    return type(obj)(v._data if isinstance(v, ndarray) else _host_sequence(v) if isinstance(v, (list, tuple))
                     else v for v in obj)


def asarray(a, dtype=None, order=None, *, blocking=False):
    """`a` on the device: the same array when it already is one of this dtype, else a copy."""
    if isinstance(a, ndarray) and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype, copy=False, order=order or "K")


asanyarray = asarray


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"ascontiguousarray: a must be a cupy.ndarray, got {type(a)}")
    data = numpy.ascontiguousarray(a._data, dtype=dtype)
    return a if data is a._data else ndarray._from_host(data)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A host copy of `a` (a device array, or anything NumPy takes)."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    result = numpy.asarray(a, order=order)
    if out is not None:
        out[...] = result
        return out
    return result


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else numpy


def fuse(*args, **kwargs):
    return (lambda f: f) if not args or not callable(args[0]) else args[0]


# NumPy's dtypes and constants, as CuPy re-exports them
for _name in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "intp",
              "float16", "float32", "float64", "complex64", "complex128", "dtype", "finfo", "iinfo", "can_cast",
              "promote_types", "newaxis", "inf", "nan", "pi", "e", "integer", "floating", "number"):
    globals()[_name] = getattr(numpy, _name)
del _name



def _norm(x, ord=None, axis=None, keepdims=False):  # noqa: A002  (NumPy's name)
    return _call(numpy.linalg.norm, "linalg.norm", (x,), {"ord": ord, "axis": axis, "keepdims": keepdims})


linalg = types.SimpleNamespace(norm=_norm)


# ----------------------------------------------------------------------------------------------
# the device, memory pool and cupyx


class _Device:
    id = 0

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEVICE = _Device()


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_POOL = _MemoryPool()


def get_default_memory_pool():
    return _POOL


cuda = types.SimpleNamespace(Device=lambda device=None: _DEVICE,
                             runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))


def _scatter_add(a, slices, value):
    """cupyx.scatter_add: a[slices] += value, summing repeated indices (in place)."""
    if not isinstance(a, ndarray):
        raise TypeError(f"scatter_add: a must be a cupy.ndarray, got {type(a)}")
    if isinstance(value, numpy.ndarray):
        raise _unsupported(value, "scatter_add")
    numpy.add.at(a._data, _index(slices), _device(value, "scatter_add"))


cupyx = types.ModuleType("cupyx")
cupyx.scatter_add = _scatter_add


def refused(cupy) -> dict:
    """Operations that CuPy refuses with TypeError, for a module `cupy` (this stand-in or the real one):
    implicit conversions to NumPy and NumPy arrays mixed into device operations. The stand-in's tests and
    tests/test_cupy.py (on a GPU) run the same list, so the stand-in is held to CuPy's behaviour."""
    x = cupy.asarray(numpy.arange(6.0).reshape(2, 3))
    host = numpy.ones(3)
    return {
        "numpy.asarray(x)": lambda: numpy.asarray(x),
        "numpy.array(x)": lambda: numpy.array(x),
        "host + numpy.asarray(x)": lambda: numpy.zeros((2, 3)) + numpy.asarray(x),
        "range(0-d x)": lambda: range(x[0, 1]),
        "x + host": lambda: x + host,
        "host * x": lambda: host * x,
        "x += host": lambda: x.__iadd__(host),
        "x - 0-d host": lambda: x - numpy.asarray(1.0),
        "cupy.exp(host)": lambda: cupy.exp(host),
        "numpy.maximum(x, host)": lambda: numpy.maximum(x, host),
        "numpy.exp(x, out=host)": lambda: numpy.exp(x, out=numpy.empty((2, 3))),
        "cupy.where(x > 1, host, x)": lambda: cupy.where(x > 1, host, x),
        "numpy.concatenate([x, host])": lambda: numpy.concatenate([x, host[None]]),
        "x.sum(where=...)": lambda: x.sum(where=x > 0),
        "a NumPy function CuPy lacks": lambda: numpy.histogram_bin_edges(x),
    }


def allowed(cupy) -> dict:
    """Operations that CuPy allows between host and device (explicit copies, scalars, one-element
    conversions, NumPy's dispatch to the device module), each returning True when its result is right."""
    host = numpy.arange(6.0).reshape(2, 3)
    x = cupy.asarray(host)

    def is_device(value):
        return isinstance(value, cupy.ndarray)

    return {
        "cupy.asarray(host), .get()": lambda: numpy.array_equal(x.get(), host) and type(x.get()) is numpy.ndarray,
        "cupy.asnumpy(x)": lambda: numpy.array_equal(cupy.asnumpy(x), host),
        "float, int, bool, item of one element": lambda: (float(x[0, 1]), int(x[1, 2]), bool(x[0, 1]),
                                                          x.sum().item()) == (1.0, 5, True, 15.0),
        "a reduction is a 0-d device array": lambda: is_device(x.sum()) and x.sum().shape == (),
        "NumPy and Python scalars": lambda: is_device(numpy.float32(2.0) * x) and is_device(2 * x),
        "comparison with a 0-d host array": lambda: is_device(x == numpy.asarray(1.0)),
        "NumPy ufuncs and functions dispatch": lambda: is_device(numpy.exp(x)) and is_device(numpy.sum(x, 0)),
        "a host index array": lambda: numpy.array_equal(x[numpy.array([1, 0])].get(), host[[1, 0]]),
        "f-strings": lambda: f"{x[0, 1]:.1f}" == "1.0",
    }


def install(monkeypatch) -> types.ModuleType:
    """Register this stand-in as the modules `cupy` and `cupyx` for the test (undone by monkeypatch)."""
    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    return module
